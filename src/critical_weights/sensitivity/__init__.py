"""The `sensitivity` stage (stage): the loss the gradients are taken of (loss), micro-batches by
sequences and tokens (batching), one forward+backward pass that accumulates every metric's sums
(accumulate) with the activation statistics some metrics need (activations), activation
checkpointing (recompute), data parallelism under torchrun (distributed), and scoring the sums
into per-parameter top-k candidates and exact statistics (scoring).
"""
