"""critical-weights: find the weights of a causal language model that matter most.

The package is split one module per concept. Modules used after the `sensitivity`
stage (shards, ranking, export, plots) never import torch, so those stages start fast.
"""

__version__ = "0.1.0"
