"""One way to measure a compressed model: the texts, and the loss on them.

Every perplexity of `compress` and `quantize` is exp of validate's own loss
(critical_weights.validation.evaluation: the mean next-token cross-entropy over every
predicted token), with the top-1 agreement with the unchanged model beside it, on:
- the primary texts: `compress.n_texts` held-out source texts, drawn as validate draws its own
  (in-sample prepared texts when none is held out, with a warning); or, with
  `compress.stream`, the papers' protocol: a source joined into one token stream, cut into
  non-overlapping windows of `compress.context` tokens;
- beside them, `compress.in_sample_texts` of the prepared texts (the ones the scores were
  computed on), drawn as validate draws them, unless the primary texts are in-sample already.

Each text set carries its protocol (source, texts or windows, tokens, context, stride), and
the reports copy it beside every number.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from critical_weights.artifacts import prepared_texts
from critical_weights.config.params import Params
from critical_weights.core.errors import ParamsError
from critical_weights.core.streams import STREAM_HOLDOUT
from critical_weights.sensitivity.loss import predicted_tokens
from critical_weights.texts import sources
from critical_weights.validation.evaluation import loss_and_top1, loss_record

log = logging.getLogger(__name__)
LOSS = "mean next-token cross-entropy over every predicted token (validate's own loss code)"
LABELS = {"heldout": "held-out texts", "in_sample": "in-sample texts", "stream": "stream windows"}


@dataclass(frozen=True)
class TextSet:
    """Token sequences a model is measured on, and how they were made."""

    name: str  # heldout, in_sample or stream
    ids: list[list[int]]
    protocol: dict[str, Any]


def _texts(name: str, ids: list[list[int]], source: str, context: int) -> TextSet:
    return TextSet(name, ids, {"texts": name, "source": source, "n_texts": len(ids), "n_tokens": predicted_tokens(ids),
                               "context": context, "windows": False, "stride": None, "loss": LOSS})


def text_sets(prepared: Path, source: Path, params: Params) -> list[TextSet]:
    """The primary text set first, then the in-sample texts beside it (module docstring)."""
    cp, max_length = params.compress, params.texts.max_length
    input_ids, _ = prepared_texts.read_prepared(prepared)
    if cp.stream != "none":
        windows, counts = sources.stream_windows(Path(cp.stream), prepared, cp.context, cp.max_windows)
        primary = TextSet("stream", windows, {
            "texts": "stream", "source": Path(cp.stream).name,  # its name and sha256, not a machine path
            "n_windows": len(windows), "n_tokens": predicted_tokens(windows),
            "context": cp.context, "windows": True, "stride": cp.context,
            "joined": "a .txt file as it is; the rows of a .jsonl or .parquet (or a folder's files) joined with a blank "
                      "line, as the Wanda and SparseGPT code join WikiText-2's rows",
            "tokens_in_stream": counts["n_stream_tokens"], "full_windows": counts["n_windows_full"],
            "tokens_left_out": counts["n_left_out"], "text_sha256": counts["text_sha256"], "loss": LOSS})
        log.info("compress.stream: %d windows of %d tokens from %s (%d tokens; %d left out past the last window used)",
                 len(windows), cp.context, cp.stream, counts["n_stream_tokens"], counts["n_left_out"])
    else:
        heldout, missing = sources.unchosen_ids(source, prepared, cp.n_texts, max_length, params.seed, STREAM_HOLDOUT,
                                                "compress.n_texts")
        if heldout:
            primary = _texts("heldout", heldout, str(source), max_length)
        else:
            log.warning("compress: no held-out texts (%s); every loss is measured in-sample", missing)
            return [_texts("in_sample", sources.in_sample(input_ids, cp.n_texts, params.seed, "compress.n_texts"),
                           str(source), max_length)]
    if cp.in_sample_texts == 0:
        return [primary]
    beside = sources.in_sample(input_ids, cp.in_sample_texts, params.seed, "compress.in_sample_texts")
    return [primary, _texts("in_sample", beside, str(source), max_length)]


def check_context(model: torch.nn.Module, sets: list[TextSet]) -> None:
    """A stream window longer than the model's positions is a one-line error, not garbage."""
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max((len(s) for t in sets for s in t.ids), default=0)
    if limit and sets[0].name == "stream" and longest > limit:
        raise ParamsError([f"compress.context: {longest} tokens per window exceeds the model's "
                           f"max_position_embeddings {limit}; use at most {limit}"])


class Measurer:
    """Validate's loss and top-1 predictions on every text set, timed. The first call measures
    the model as loaded, the baseline of every later one. `measure` gives the primary set's
    loss, perplexity, increase and top-1 agreement, and each other set's under its name
    (`in_sample_loss`, ...)."""

    def __init__(self, model: torch.nn.Module, sets: list[TextSet], params: Params, step: Any):
        self.model, self.sets, self.step = model, sets, step
        self.batching = (params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens)
        self.seconds = 0.0
        first = [self._loss(t) for t in sets]
        self.baselines = [loss for loss, _ in first]
        self.top1 = [top for _, top in first]
        self.baseline = self.baselines[0]

    def _loss(self, texts: TextSet) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        loss, top1 = loss_and_top1(self.model, texts.ids, *self.batching)
        self.seconds += time.perf_counter() - start
        self.step()
        return loss, top1

    def measure(self) -> dict[str, Any]:
        """The model as it is now, on every text set (class docstring)."""
        out: dict[str, Any] = {}
        for i, texts in enumerate(self.sets):
            loss, got = self._loss(texts)
            record = {**loss_record(loss, self.baselines[i]), "top1_agreement": float((got == self.top1[i]).double().mean())}
            out.update(record if i == 0 else {f"{texts.name}_{k}": v for k, v in record.items()})
        return out
