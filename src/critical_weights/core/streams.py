"""The independent random streams, all drawn from the one `seed` param.

Each choice a stage makes at random uses its own stream, np.random.default_rng([seed,
STREAM, ...]), so changing how many draws one choice makes never moves another's. `prepare`
draws its texts from `seed` alone.
"""

STREAM_TEXTS = 1  # the in-sample share of the prepared texts (validate, superweights)
STREAM_HOLDOUT = 2  # held-out source texts, from those prepare did not choose (validate, compress)
STREAM_RANDOM_K = 3  # random_k controls and superweights' random weights
STREAM_NOISE = 4  # gauss_noise perturbations
STREAM_SAMPLE = 5  # the weights sampled to test each metric's predictions
STREAM_PRUNE = 6  # compress: the random pruning scores
STREAM_EXPERTS = 7  # compress: the random experts dropped
STREAM_DOMAINS = 8  # domains: each group's in-sample and held-out texts
