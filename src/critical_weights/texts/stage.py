"""The `prepare` stage: choose and tokenise the texts with the model's own tokenizer.

Two checks keep the tokens honest: a folder's tokenizer.json must split the texts as the class
transformers loads for it does (it may substitute a model-specific class), and the saved
tokenizer, reloaded as later stages load it, must give the same token ids again.
"""

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
        model_source = resolve_source(params.model.name)
        tokenizer = tokenization.load_tokenizer(model_source, params.model)
    with timings.phase("tokenise"):
        prepared = sources.prepare_texts(
            raw, params.texts.n_texts, params.texts.max_length, params.seed,
            tokenize=lambda t: tokenizer(t)["input_ids"],
        )
        tokenization.check_against_file(model_source, tokenizer, prepared.texts)
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
        tokenization.check_reloads(tmp / prepared_texts.TOKENIZER_DIR, prepared.texts, prepared.input_ids,
                                   params.texts.max_length)
