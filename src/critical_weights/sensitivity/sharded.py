"""Sharded sensitivity under FSDP2 (`model.parallel: fsdp`, launched by torchrun): each rank
holds, sums and scores only its own rows of every weight.

Units. Each transformer block is an FSDP2 unit (`torch.distributed.fsdp.fully_shard`), and so
are the input embedding and the output head when they are two matrices; a tied pair stays
with the root, which keeps it one parameter. The root is `LossRoot`: its forward runs the
whole loss (the base model, then the model's own output path in checkpointed chunks,
`loss.token_loss_sum`), so every parameter is gathered inside an FSDP forward.

Gradients. The ranks share the micro-batches, and FSDP reduce-scatters each backward's
gradient as a plain sum (FSDP2 takes the mean over ranks unless told otherwise, and gloo has
no pre-multiplied sum), so each rank ends with its own rows of dL/dW in float32. Every rank
must run as many backward passes as the others: a rank short of micro-batches runs a filler
of weight 0. fisher and taylor2 square each sequence's own gradient g_n, which a
reduce-scatter of different sequences would sum first: for them the ranks take the sequences
one at a time together, the first rank weighing it 1 and the others 0, so every rank holds its
rows of g_n exactly; that pass runs at one process's speed, with 1/world of its memory.
hutchinson needs double backward, which FSDP2 does not run: `config.params` refuses it.

Scoring. Each rank scores its rows (`writing.pick` with the rows' place in the whole matrix,
from DTensor's placement); rank 0 gathers the summaries, merges them exactly
(`scoring.merge`) and writes the shards as one process writes them (`writing.Writing`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from critical_weights.config.params import ModelParams, Params
from critical_weights.core.errors import ModelError, NumericalError, ParamsError, RanksError, out_of_memory
from critical_weights.core.progress import Timings, progress
from critical_weights.metrics import accumulators_for
from critical_weights.model import layout, loading, rows
from critical_weights.model.source import ModelSource, resolve_source
from critical_weights.sensitivity import activations, distributed, scoring, writing
from critical_weights.sensitivity.accumulate import Accumulators, scored_parameters
from critical_weights.sensitivity.batching import make_batches
from critical_weights.sensitivity.loss import check_finite_loss, check_output_path, pad_batch, perplexity, predicted_tokens, token_loss_sum
from critical_weights.sensitivity.recompute import checkpointed_blocks

log = logging.getLogger(__name__)


def launch(p_model: ModelParams, argv: list[str]) -> bool:
    """With `model.parallel: fsdp` and no torchrun around this process (`dvc repro`): run the same
    command as `torchrun --standalone` would (one OpenMP thread a rank unless OMP_NUM_THREADS
    says otherwise), with `model.processes` ranks (0: one per visible GPU), and say True once
    they all succeeded; False where there is nothing to launch. The model source is resolved
    first, so a wrong name fails here in one line; a rank that fails stops the others."""
    if p_model.parallel != "fsdp" or "WORLD_SIZE" in os.environ:
        return False
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    on_gpus = torch.cuda.is_available() and p_model.device != "cpu"
    gpus = torch.cuda.device_count() if on_gpus else 0
    n = p_model.processes or gpus
    if n < 2:
        seen = "model.device is cpu" if p_model.device == "cpu" else f"this machine shows {gpus} GPU(s)"
        raise ParamsError([f"model.processes: 0 starts one process per visible GPU, and {seen}; set model.processes "
                           "to 2 or more, or launch the stage under torchrun yourself"])
    if on_gpus and n > gpus:
        raise ParamsError([f"model.processes: {n} processes need a GPU each, and this machine shows {gpus}; "
                           f"allowed here: 0 or 2 to {gpus}"])
    resolve_source(p_model.name)
    log.info("model.parallel fsdp: starting %d processes (torchrun --standalone --nproc_per_node %d %s)",
             n, n, " ".join(argv))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it for several processes
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks speak for themselves
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)(*argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"stopped with exit status {failure.exitcode}; its error is above")
        raise RanksError(f"model.parallel fsdp: rank {rank} of {n} {how}") from None
    except SignalException:
        raise KeyboardInterrupt from None  # every rank has been stopped; said in one line
    return True


def check_world() -> None:
    """Sharding needs torchrun's processes."""
    if distributed.world()[1] < 2:
        raise ParamsError(["model.parallel: 'fsdp' shards the model over torchrun's processes, but this run has one; "
                           "launch the stage with torchrun --nproc_per_node N (N >= 2), or set model.parallel none"])


class LossRoot(torch.nn.Module):
    """The FSDP root: forward(ids, mask) is the summed token loss of a padded batch through the
    model's own output path; forward(ids, mask, check=True) runs `loss.check_output_path` on
    the first row instead (both need every parameter gathered, which only the root's forward does)."""

    def __init__(self, model: torch.nn.Module, compute_dtype: torch.dtype):
        super().__init__()
        self.model, self.compute_dtype = model, compute_dtype

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, check: bool = False) -> torch.Tensor:
        if check:
            check_output_path(self.model, ids[0].tolist(), dtype=self.compute_dtype)
            return ids.new_zeros(())
        return token_loss_sum(self.model, ids, mask)


def tied(model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def shard(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> LossRoot:
    """Make the blocks, the embedding and the head (when untied) FSDP2 units and wrap the model
    in its `LossRoot`; parameters stay in their stored dtype (float32 sums need float32
    gradients), computed in `compute_dtype` with float32 reduction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    path = layout.block_list(model)
    if path is None:
        raise ModelError(f"model.parallel: fsdp: {type(model).__name__} has no list of blocks to shard; "
                         "set model.parallel none")
    mesh = init_device_mesh(device.type, (distributed.world()[1],))
    stored = next(model.parameters()).dtype
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype if compute_dtype != stored else None,
                                  reduce_dtype=torch.float32)
    units = list({id(b): b for b in model.get_submodule(path)}.values())
    if not tied(model):
        units += [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    root = fully_shard(LossRoot(model, compute_dtype), mesh=mesh, mp_policy=policy)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum over ranks, not their mean ...
            module.set_force_sum_reduction_for_comms(True)  # ... by plain SUM, which gloo has
            module.set_reduce_scatter_unused_params(True)  # an expert no token of this rank reached: zeros, same collectives
    log.info("FSDP2: %d units over %d ranks (%s embedding and head), stored %s, computed in %s",
             len(units) + 1, distributed.world()[1], "tied" if tied(model) else "separate",
             str(stored).removeprefix("torch."), str(compute_dtype).removeprefix("torch."))
    return root


def local_rows(p: torch.Tensor) -> tuple[int, int]:
    """(first row, rows in all) of this rank's shard of `p` in the stored-matrix view
    (`scoring.as_matrix`): FSDP2 shards dim 0, and a row of the view is one index of dims 0..-2."""
    per = math.prod(p.shape[1:-1]) if p.ndim >= 2 else 1
    return rows.dim0_range(p)[0] * per, math.prod(p.shape[:-1]) if p.ndim >= 2 else p.shape[0]


def _local_act_sq(held: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter's input norms (`activations.InputNorms` shapes):
    (cols,) as is; (rows, 1) its rows; (E, 1, cols) its experts."""
    local = p.to_local()
    if held.ndim == 1 or local.numel() == 0:
        return held
    first, _ = local_rows(p)
    if held.ndim == 2:
        return held[first : first + scoring.as_matrix(local).shape[0]]
    per = math.prod(p.shape[1:-1])
    return held[first // per : first // per + local.shape[0]]


def accumulate(root: LossRoot, input_ids: list[list[int]], params_list: list[tuple[str, torch.nn.Parameter]],
               metrics: list[str], micro_batch_size: int, batch_tokens: int) -> tuple[Accumulators, dict[str, str]]:
    """One pass over the texts on every rank; the sums hold this rank's rows (act_sq, router
    counts and the loss are whole, all-reduced). Returns them and wanda's skipped parameters."""
    model = root.model
    needs = accumulators_for(metrics)
    rank, world = distributed.world()
    n_tokens, n_seq = predicted_tokens(input_ids), len(input_ids)
    per_sequence = "fisher" in needs
    lengths = [len(s) for s in input_ids]
    if per_sequence:
        log.info("fisher/taylor2 under FSDP: the ranks take each sequence together, counted once")
        plan = [(b, rank == 0) for b in make_batches(lengths, 1)]
    else:
        batches = make_batches(lengths, micro_batch_size, batch_tokens)
        mine = batches[rank::world]
        plan = [(b, True) for b in mine] + [(batches[-1], False)] * (-(-len(batches) // world) - len(mine))
    whole = [n for n, p in params_list if not isinstance(p, DTensor)]
    if whole:
        raise ModelError(f"model.parallel fsdp: {whole[0]} is not sharded (a module outside the FSDP units, "
                         "or parameters taken while the root was gathered)")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in params_list:
        p.requires_grad_(True)
        p.grad = None
    grad = {n: torch.zeros_like(p.to_local(), dtype=torch.float32) for n, p in params_list} if per_sequence else {}
    fisher = {n: torch.zeros_like(p.to_local(), dtype=torch.float32) for n, p in params_list} if per_sequence else {}
    norms = activations.InputNorms(model, params_list) if "act_sq" in needs else None
    picks = activations.RouterPicks(model)
    watchers = [w for w in (norms, picks) if w is not None]
    device = params_list[0][1].device
    loss_sum = 0.0
    try:
        work = [sum(lengths[i] for i in b) for b, _ in plan]
        for step, (batch, counted) in enumerate(progress(plan, "forward+backward (FSDP)", work=work)):
            ids, mask = pad_batch([list(input_ids[i]) for i in batch], device)
            for w in watchers:
                w.mask, w.active = mask, counted
            loss_b = root(ids, mask)  # float32 scalar, summed over tokens
            for w in watchers:
                w.active = False
            n_pred = int(mask[:, 1:].sum())
            scale = (1.0 / n_pred if per_sequence else 1.0 / n_tokens) if counted else 0.0
            (loss_b * scale).backward()
            if counted:
                check_finite_loss(loss_b, step)
                loss_sum += float(loss_b.detach().double())
            if per_sequence:
                for name, p in params_list:
                    g = p.grad.to_local() if p.grad is not None else torch.zeros_like(grad[name])  # this rank's rows of g_n
                    grad[name].add_(g, alpha=n_pred / n_tokens)
                    fisher[name].addcmul_(g, g, value=1.0 / n_seq)
                    p.grad = None
    finally:
        for w in watchers:
            w.remove()
    if not per_sequence:  # a weight no token reached keeps a zero gradient, as in one process
        grad = {n: p.grad.to_local().float() if p.grad is not None else torch.zeros_like(p.to_local(), dtype=torch.float32)
                for n, p in params_list}
    for _, p in params_list:
        p.requires_grad_(False)
        p.grad = None
    act_sq = norms.act_sq if norms is not None else {}
    for store in (act_sq, picks.picks, picks.tokens):
        distributed.all_reduce_sum(store.values())
    acc = Accumulators(grad=grad, fisher=fisher, act_sq=act_sq, router_picks=picks.picks, router_tokens=picks.tokens,
                       loss_sum=distributed.all_reduce_float(loss_sum, device), n_tokens=n_tokens, n_sequences=n_seq)
    _check_finite(acc)
    return acc, (norms.skipped if norms is not None else {})


def _check_finite(acc: Accumulators) -> None:
    """Every rank's rows of every gradient are finite, or every rank stops with the same error."""
    bad = [n for n, g in acc.grad.items() if not bool(torch.isfinite(g).all())]
    _stop_together(bad, next(iter(acc.grad.values())).device,
                   lambda n, here: NumericalError(f"{n} gradient shards hold NaN or Inf{here}; try model.dtype float32"))


def _stop_together(bad: list[str], device: torch.device, error: Any) -> None:
    """Raise `error(count, where)` on every rank when any rank found `bad` names (a collective:
    every rank calls it), so that none waits for the others in a later collective."""
    count = torch.tensor([len(bad)], dtype=torch.int64, device=device)
    dist.all_reduce(count)
    if int(count.item()):
        raise error(int(count.item()), f" (here: {bad[0]})" if bad else "")


def merge_picked(parts: list[writing.Picked | None], keep: int) -> writing.Picked:
    """One `Picked` of a whole parameter from its ranks' parts (in rank order, which is row order)."""
    held = [p for p in parts if p is not None]
    summary = scoring.merge([p.summary for p in held], keep)
    out = [summary]
    for index, chosen in (("top_index", summary.top_index), ("bottom_index", summary.bottom_index)):
        pool = np.concatenate([getattr(p.summary, index) for p in held])
        order = np.argsort(pool, kind="stable")
        at = order[np.searchsorted(pool[order], chosen)]  # where each chosen index sits in the pool
        kind = index.removesuffix("_index")
        for value in ("weight", "grad"):
            out.append(np.concatenate([getattr(p, f"{kind}_{value}") for p in held])[at])
    return writing.Picked(*out)


def _gather_rows(local: torch.Tensor, global_shape: tuple[int, ...]) -> np.ndarray | None:
    """The whole tensor on rank 0's host (float32 numpy) from every rank's rows along dim 0,
    one rank's rows at a time, so the device holds one extra shard, never the whole; None on
    the other ranks."""
    rank, world = distributed.world()
    chunk = -(-global_shape[0] // world)  # FSDP2's rows per rank: ceil(d0 / world), the last ranks shorter or empty
    buffer = torch.zeros((chunk, *global_shape[1:]), dtype=torch.float32, device=local.device)
    if rank != 0:
        buffer[: local.shape[0]] = local
        dist.send(buffer, dst=0)
        return None
    whole = np.empty(global_shape, dtype=np.float32)
    for src in range(world):
        start = src * chunk
        n = max(0, min(chunk, global_shape[0] - start))
        if src:
            dist.recv(buffer, src=src)
        whole[start : start + n] = (local if src == 0 else buffer[:n]).cpu().numpy()
    return whole


def write(root: LossRoot, tokenizer: Any, params_list: list[tuple[str, torch.nn.Parameter]], acc: Accumulators,
          skipped: dict[str, str], params: Params, out: Path, timings: Timings, extra_meta: dict[str, Any]) -> None:
    """Every rank scores its rows of each parameter; rank 0 merges and writes the shards (and
    the whole sums, gathered one parameter at a time, when `sensitivity.save_sums`)."""
    model = root.model
    rank, world = distributed.world()
    places = layout.describe(model, [n for n, _ in params_list])
    keep = params.sensitivity.keep
    sharded_sums = ("grad", "fisher")  # this rank's rows; act_sq is whole on every rank
    kinds = [k for k in (*sharded_sums, "act_sq") if params.sensitivity.save_sums and getattr(acc, k)]
    writer = None
    if rank == 0:
        shapes = {n: tuple(p.shape) for n, p in params_list}
        writer = writing.Writing(model, tokenizer, params_list, acc, skipped, params, out, timings, extra_meta,
                                 shapes={k: shapes for k in sharded_sums})
    with writer if writer is not None else timings.phase("score"):  # the other ranks score, rank 0 also writes
        for index, (name, p) in enumerate(progress(params_list, "scoring parameter shards", len(params_list))):
            weight = p.to_local()
            local = Accumulators(grad={name: acc.grad[name]}, fisher={name: acc.fisher[name]} if acc.fisher else {},
                                 act_sq={name: _local_act_sq(acc.act_sq[name], p)} if name in acc.act_sq else {})
            parts = {m: writing.pick(m, name, weight, local, keep, places[name].n_experts or 0, rows_of=local_rows(p))
                     for m in writing.scored_metrics(params, name, skipped)}
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(parts, gathered, dst=0)
            for kind in kinds:
                held = getattr(acc, kind).get(name)
                if held is None:
                    continue
                whole = _gather_rows(held, tuple(p.shape)) if kind in sharded_sums else held.float().cpu().numpy()
                if writer is not None:
                    writer.sums[kind].write(name, whole)
            if writer is not None:
                merged = {m: merge_picked([g[m] for g in gathered], keep) for m in parts}
                writer.add(writing.scored(index, places[name], writer.tokenizer_of(p), merged))
            writing.free(acc, name)


def load(source: ModelSource, p_model: ModelParams, device: torch.device, compute_dtype: torch.dtype) -> LossRoot:
    """The model sharded over the ranks. Parameters are kept in float32 (so that FSDP's
    gradients are float32 sums) holding the values of `compute_dtype`, the ones a one-process
    run in that dtype holds and the later stages load. Built empty with each rank reading its
    own rows (`model.rows`) where the checkpoint allows; else loaded whole on every rank (on
    the CPU) and then sharded, with the reason in the log. The ties are checked after."""
    model, index, why = rows.empty_model(source, p_model, torch.float32)
    if model is None:
        log.info("model.parallel fsdp: %s loads whole on every rank before sharding, each holding it in float32 "
                 "host memory meanwhile: %s", source.name, why)
        model = loading.load_model(source, p_model, torch.device("cpu"), torch.float32, whole_on_every_rank=True)
        root = shard(model, device, compute_dtype)
    else:
        root = shard(model, device, compute_dtype)
        rows.fill(root, model, index, device)
        _check_finite_weights(source.name, model)
    if compute_dtype != torch.float32:
        with torch.no_grad():
            for p in model.parameters():
                local = p.to_local()
                local.copy_(local.to(compute_dtype).float())
    config_ties = bool(getattr(model.config, "tie_word_embeddings", False))
    if config_ties and not tied(model):
        raise ModelError(f"model.name: {source.name}: its config ties the embedding and the head, but after sharding "
                         "they are two parameters; model.parallel fsdp cannot score it as one (set model.parallel none)")
    if tied(model) and not config_ties:
        log.info("model.parallel fsdp: %s shares one matrix between embedding and head though its config does not "
                 "say so; scored once, as one process does", source.name)
    return root


def _check_finite_weights(name: str, model: torch.nn.Module) -> None:
    """`loading.check_finite_weights` on each rank's own rows, every rank stopping together."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p.to_local()).all())]
    _stop_together(bad, next(model.parameters()).device, lambda n, here: ModelError(
        f"model.name: {name}: {n} parameter shards hold NaN or infinite weights{here}; the checkpoint is corrupt"))


def run(root: LossRoot, tokenizer: Any, input_ids: list[list[int]], params: Params, out: Path, timings: Timings,
        extra_meta: dict[str, Any]) -> None:
    """The pass over the texts on the sharded model, then the shards (written by rank 0)."""
    model, p_sens = root.model, params.sensitivity
    device = next(model.parameters()).device
    first = torch.tensor([input_ids[0][:32]], device=device)
    with torch.no_grad():
        root(first, torch.ones_like(first), check=True)
    root.reshard()  # the root keeps its parameters gathered after a forward; the modules hold the shards again
    params_list = scored_parameters(model, p_sens.parameters)
    recompute = checkpointed_blocks(model) if p_sens.checkpointing else contextlib.nullcontext()
    with timings.phase("forward+backward"), recompute:
        try:
            acc, skipped = accumulate(root, input_ids, params_list, list(p_sens.metrics), p_sens.micro_batch_size,
                                      p_sens.batch_tokens)
        except torch.OutOfMemoryError:
            raise out_of_memory(p_sens.micro_batch_size, p_sens.batch_tokens, max(map(len, input_ids)),
                                p_sens.checkpointing) from None
    for name, why in skipped.items():
        log.info("wanda skips %s: %s", name, why)
    write(root, tokenizer, params_list, acc, skipped, params, out, timings, extra_meta)
    if distributed.is_main():
        avg = acc.loss_sum / acc.n_tokens
        log.info("avg loss %.4f over %d tokens (perplexity %.2f), FSDP over %d ranks",
                 avg, acc.n_tokens, perplexity(avg), distributed.world()[1])
