"""The `sensitivity` stage: load the model, accumulate gradients, score every weight into shards.

The stages after it (rank, export, plot) live in torch-free modules.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from critical_weights.artifacts import prepared_texts
from critical_weights.config.params import Params
from critical_weights.core.errors import out_of_memory
from critical_weights.core.progress import Timings
from critical_weights.model import loading
from critical_weights.model.source import resolve_source
from critical_weights.sensitivity import distributed, sharded
from critical_weights.sensitivity.accumulate import Accumulators, accumulate, scored_parameters
from critical_weights.sensitivity.loss import check_output_path, perplexity
from critical_weights.sensitivity.recompute import checkpointed_blocks
from critical_weights.sensitivity.writing import write_shards

log = logging.getLogger(__name__)


def run_sensitivity(prepared: Path, params: Params, out: Path, timings: Timings) -> None:
    """Gradients over the prepared texts, then per-parameter scores into Parquet shards.

    Under `torchrun`, each process takes a share of the micro-batches. With `model.parallel:
    none` the sums are all-reduced and the first process scores and writes; with `fsdp` each
    process holds, sums and scores its own rows of every weight (`sensitivity.sharded`)."""
    p_model = params.model
    device, dtype = loading.resolve_device(p_model)  # a device or dtype this machine lacks fails here, before any work
    input_ids, prep_meta = prepared_texts.read_prepared(prepared)
    fsdp = p_model.parallel == "fsdp"
    with timings.phase("load model"):
        source = resolve_source(p_model.name)
        distributed.init_from_env(device.type == "cuda")
        device = distributed.local_device(device)
        if fsdp:
            sharded.check_world()
            root = sharded.load(source, p_model, device, dtype)
            model = root.model
        else:
            model = loading.load_model(source, p_model, device, dtype)
        # the manifest's identity hashes every weight file: one rank does it for all
        identity = loading.identity(source, model, device) if distributed.is_main() else {}
    loading.check_vocabulary(source.name, model, input_ids)
    extra = {"model": identity, "text_sha256": prep_meta.get("text_sha256"), "prepare": prep_meta}
    if fsdp:
        extra["model"]["parallel"] = {"mode": "fsdp", "ranks": distributed.world()[1],
                                      "compute_dtype": str(dtype).removeprefix("torch.")}
        sharded.run(root, prepared / prepared_texts.TOKENIZER_DIR, input_ids, params, out, timings, extra)
        return
    compute_shards(model, prepared / prepared_texts.TOKENIZER_DIR, input_ids, params, out, timings, extra)


def compute_shards(model: torch.nn.Module, tokenizer: Any, input_ids: list[list[int]], params: Params,
                   out: Path, timings: Timings, extra_meta: dict[str, Any]) -> None:
    """The work after loading: accumulate over the texts, score every parameter, write shards.

    `tokenizer` (it decodes the rows of token matrices) may be the folder to load it from,
    which then happens after the pass, so that it does not add to the pass's peak memory."""
    params_list, acc, skipped, extra_meta = gradients(model, input_ids, params, timings, extra_meta)
    avg_loss = acc.loss_sum / acc.n_tokens
    if not distributed.is_main():
        return  # every process holds the all-reduced sums; the first one writes them
    write_shards(model, tokenizer, params_list, acc, skipped, params, out, timings, extra_meta)
    log.info("avg loss %.4f over %d tokens (perplexity %.2f)", avg_loss, acc.n_tokens, perplexity(avg_loss))


def gradients(model: torch.nn.Module, input_ids: list[list[int]], params: Params, timings: Timings,
              extra_meta: dict[str, Any], phase: str = "forward+backward"
              ) -> tuple[list[tuple[str, torch.nn.Parameter]], Accumulators, dict[str, str], dict[str, Any]]:
    """One pass over the texts: the scored parameters, their sums (`accumulate`), the
    parameters wanda skips with the reason, and the meta with the implementations in use.
    Checks first that the scoring path gives the model's own logits (`check_output_path`)."""
    p_sens = params.sensitivity
    if "hutchinson" in p_sens.metrics:
        # Hessian-vector products need double backward, which fused SDPA and grouped_mm kernels lack
        loading.use_implementations(model, "hutchinson needs double backward", attention="eager", experts="eager")
    recompute = checkpointed_blocks(model) if p_sens.checkpointing else contextlib.nullcontext()
    extra_meta = {**extra_meta, "model": {**extra_meta.get("model", {}), "implementations": loading.implementations(model)}}
    params_list = scored_parameters(model, p_sens.parameters)
    check_output_path(model, input_ids[0])
    with timings.phase(phase), recompute:
        try:
            acc, skipped = accumulate(
                model, input_ids, params_list, p_sens.metrics, p_sens.micro_batch_size,
                p_sens.batch_tokens, p_sens.hutchinson_probes, params.seed,
            )
        except torch.OutOfMemoryError:
            raise out_of_memory(p_sens.micro_batch_size, p_sens.batch_tokens, max(map(len, input_ids)),
                                p_sens.checkpointing) from None
    for name, why in skipped.items():
        log.info("wanda skips %s: %s", name, why)
    return params_list, acc, skipped, extra_meta
