"""Ranking the shards: the exact top-k per tensor, block, component or globally (topk), the `rank`
stage (stage), the rank of given weights under every metric (weight_ranks), and how far the
metrics agree on their top-k (overlap). Torch-free.
"""
