"""The `prepare` stage: choose and tokenise the texts with the model's own tokenizer."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from critical_weights.artifacts import prepared_texts
from critical_weights.config.params import Params
from critical_weights.core.outputs import atomic_path
from critical_weights.core.progress import Timings
from critical_weights.model import tokenization
from critical_weights.model.source import resolve_source
from critical_weights.texts import sources

log = logging.getLogger(__name__)


def run_prepare(source: Path, params: Params, out: Path, timings: Timings) -> None:
    """Choose and tokenise the texts; write `texts.parquet` and the tokenizer to `out`."""
    with timings.phase("read texts"):
        raw = sources.read_texts(source)
    with timings.phase("load tokenizer"):
        tokenizer = tokenization.load_tokenizer(resolve_source(params.model.name), params.model)
    with timings.phase("tokenise"):
        prepared = sources.prepare_texts(
            raw, params.texts.n_texts, params.texts.max_length, params.seed,
            tokenize=lambda t: tokenizer(t)["input_ids"],
        )
    meta = {
        "source": str(source),
        "n_available": str(prepared.n_available),
        "n_texts": str(len(prepared.texts)),
        "n_tokens": str(sum(len(s) for s in prepared.input_ids)),
        "text_sha256": prepared_texts.text_set_hash(prepared.input_ids),
        "params": json.dumps({"seed": params.seed, "texts": dataclasses.asdict(params.texts), "model.name": params.model.name}, sort_keys=True),
    }
    log.info("prepared %s texts, %s tokens", meta["n_texts"], meta["n_tokens"])
    with timings.phase("write"), atomic_path(out) as tmp:
        prepared_texts.write_prepared(tmp, prepared, meta)
        tokenizer.save_pretrained(tmp / prepared_texts.TOKENIZER_DIR)
