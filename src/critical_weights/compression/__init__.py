"""Compression guided by the scores: prune every weight tensor of the blocks by each metric
(unstructured per row or per tensor, and N:M) and export the masks (stage compress); quantise
them by round-to-nearest with each metric's critical weights kept (stage quantize); measure what
each costs."""
