"""The ground floor every other package stands on: the project's errors and their one-line
reporting (errors), outputs written atomically (outputs), logging, progress and per-phase
timings (progress), the CPU-kernel pin that makes float sums reproducible across CPUs
(kernels), and the independent random streams drawn from the one seed (streams). Nothing here
imports another package of the project, and nothing here imports torch at module level.
"""
