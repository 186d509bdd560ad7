"""critical-weights: find the weights of a causal language model that matter most.

Subpackages by idea, read top-down: the stage packages (texts, sensitivity, ranking, reports,
validation, superweights) stand on the shared ones (model, artifacts, config), which stand on
core; the metric registry (metrics) and the stage scripts' plumbing (cli) sit at the top.
Package __init__ files import nothing, so the torch-free stages (rank, export, plot) stay
torch-free. Importing the package pins torch's CPU kernels first (critical_weights.core.kernels).
"""

from critical_weights.core import kernels

kernels.pin()

__version__ = "0.1.0"
