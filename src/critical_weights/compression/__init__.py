"""Compression guided by the scores: prune every weight tensor of the blocks by each metric
(unstructured per row or per tensor, and N:M), measure what it costs, and export the masks."""
