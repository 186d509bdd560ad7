"""The `superweights` stage (stage): super-weight candidates and massive activations found from
forward passes alone (detect), the loss after zeroing each candidate beside its controls
(damage), and the report, per-block table and figure (report).
"""
