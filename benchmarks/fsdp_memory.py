"""Per-GPU memory of `model.parallel: fsdp` on paper: Llama-3.1-70B and 405B over 8, 16, 64 and
128 GPUs of 80 GB, from the models' shapes and what the sharded stage holds. Nothing here is
measured; it prints the table docs/scale.md quotes.

    python benchmarks/fsdp_memory.py

What each rank holds (`critical_weights.sensitivity.sharded`), in GB of 10^9 bytes:
- parameters: its 1/G of the weights, stored float32 (4 bytes a weight), so that FSDP's
  reduce-scattered gradients are float32 too;
- gradient sums: its 1/G of dL/dW in float32 (FSDP's sharded .grad); fisher and taylor2 add
  two more float32 copies (the weighted sum and the sum of squares beside each sequence's .grad);
- the largest transient unit: in forward, the gathered bf16 weights of a unit and of the one
  FSDP prefetches; in backward the same, plus the unit's unsharded bf16 gradient and its
  float32 copy that the reduce-scatter takes: 2 + 2 + 2 + 4 = 10 bytes per weight of the
  largest unit (a block, or the 128,256-row embedding or head, each a unit when untied);
- activations with checkpointing (`sensitivity.checkpointing`): each block's bf16 input for
  the micro-batch's tokens, plus one block's recomputed activations, estimated as
  tokens x (12 hidden + 3 intermediate) bf16 values, plus the head's float32 logit chunk
  (256 MiB, `loss.LOGITS_BUDGET_BYTES`) three times over (logits, softmax, gradient);
- scoring temporaries: one chunk of 2^26 scores at about 40 bytes a score (`scoring.CHUNK_ELEMENTS`).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
VOCAB = 128_256
TOKENS = 4 * 512  # a micro-batch of 4 sequences of 512 tokens
LOGITS_CHUNK = 1 << 28  # bytes, loss.LOGITS_BUDGET_BYTES
SCORE_CHUNK = (1 << 26) * 40  # bytes, scoring.CHUNK_ELEMENTS scores at about 40 bytes each
GPU_GB = 80


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int

    @property
    def block(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden  # q, o, k, v; gate, up, down; norms

    @property
    def weights(self) -> int:
        return self.layers * self.block + 2 * VOCAB * self.hidden + self.hidden  # untied embedding and head

    @property
    def largest_unit(self) -> int:
        return max(self.block, VOCAB * self.hidden)


SHAPES = (Shape("Llama-3.1-70B", 8192, 80, 28672, 64, 8), Shape("Llama-3.1-405B", 16384, 126, 53248, 128, 8))


def per_gpu(shape: Shape, gpus: int, per_sequence: bool = False) -> dict[str, float]:
    """GB per GPU of each part, and their total."""
    parts = {
        "parameters": 4 * shape.weights / gpus,
        "gradient sums": 4 * shape.weights / gpus * (3 if per_sequence else 1),
        "largest unit": 10 * shape.largest_unit,
        "activations": 2 * TOKENS * shape.hidden * shape.layers + 2 * TOKENS * (12 * shape.hidden + 3 * shape.intermediate)
        + 3 * LOGITS_CHUNK,
        "scoring": SCORE_CHUNK,
    }
    parts = {k: v / GB for k, v in parts.items()}
    return {**parts, "total": sum(parts.values())}


def table() -> str:
    lines = ["| model | GPUs | parameters | gradient sums | largest unit | activations | scoring | total | fits 80 GB | with fisher |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for shape in SHAPES:
        for gpus in (8, 16, 64, 128):
            p, f = per_gpu(shape, gpus), per_gpu(shape, gpus, per_sequence=True)
            lines.append(f"| {shape.name} ({shape.weights / 1e9:.1f}B) | {gpus} | {p['parameters']:.1f} | "
                         f"{p['gradient sums']:.1f} | {p['largest unit']:.1f} | {p['activations']:.1f} | "
                         f"{p['scoring']:.1f} | {p['total']:.1f} | {'yes' if p['total'] <= GPU_GB else 'no'} | "
                         f"{f['total']:.1f} ({'yes' if f['total'] <= GPU_GB else 'no'}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
