"""critical-weights: find the weights of a causal language model that matter most.

The package is split one module per concept. Modules used after the `sensitivity`
stage (shards, ranking, export, plots) never import torch, so those stages start fast.
Importing the package pins torch's CPU kernels first (see `critical_weights.kernels`).
"""

from critical_weights import kernels

kernels.pin()

__version__ = "0.1.0"
