"""Run under torchrun by test_sharded.py: for each case of a JSON spec, build the tiny model,
check that each rank's shard is its own rows of the whole weight, shard it with FSDP2 and
write the sensitivity shards (`sensitivity.sharded.run`) into the case's folder.

    python -m torch.distributed.run --nproc_per_node N tests/sensitivity/fsdp_worker.py SPEC.json

A case with "die_on_rank": r makes that rank fail after sharding, for the test that a failing
rank takes the others with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import architectures  # noqa: E402
from _tiny import build_tiny_model, tiny_params  # noqa: E402
from critical_weights.core.progress import Timings  # noqa: E402
from critical_weights.model.rows import dim0_range  # noqa: E402
from critical_weights.sensitivity import distributed, sharded  # noqa: E402


def build(case: dict) -> torch.nn.Module:
    """The case's model: "llama_tied" (tied tiny Llama) or an `architectures` name."""
    if case["model"] == "llama_tied":
        return build_tiny_model(tie=True)
    return architectures.build(case["model"])


def params_of(case: dict, parallel: str):
    return tiny_params("unused", model={"parallel": parallel},
                       sensitivity={"metrics": tuple(case["metrics"]), "dense": False, "keep": case["keep"],
                                    "parameters": case.get("parameters", "weights"),
                                    "micro_batch_size": case["micro_batch_size"], "save_sums": True})


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    distributed.init_from_env(False)
    rank = distributed.world()[0]
    try:
        for case in spec["cases"]:
            model = build(case)
            whole = {n: p.detach().clone() for n, p in model.named_parameters()}
            root = sharded.shard(model, torch.device("cpu"), torch.float32)
            for name, p in model.named_parameters():  # each rank holds its own rows, by DTensor's placement
                start, n = dim0_range(p)
                assert torch.equal(p.to_local(), whole[name][start : start + n]), name
            if case.get("die_on_rank") == rank:
                raise SystemExit(f"rank {rank} stops here, as the case asks")
            sharded.run(root, architectures.tokenizer(), spec["ids"], params_of(case, "fsdp"), Path(case["out"]),
                        Timings("t"), {})
    finally:
        distributed.finish()


if __name__ == "__main__":
    main(sys.argv[1])
