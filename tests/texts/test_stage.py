"""critical_weights.texts.stage: prepare writes the chosen texts' token ids with the model's own
tokenizer, what it saw in the file's metadata, and the tokenizer beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from transformers import AutoTokenizer

from _tiny import tiny_params
from critical_weights.artifacts.prepared_texts import PREPARED_FILE, TOKENIZER_DIR, read_prepared, text_set_hash
from critical_weights.core.progress import Timings
from critical_weights.texts.sources import choose, read_texts
from critical_weights.texts.stage import run_prepare


def test_prepare_writes_the_chosen_texts_tokenised_and_what_it_saw(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir, texts={"n_texts": 5, "max_length": 12}, seed=3)
    source = Path(params.texts.source)
    run_prepare(source, params, tmp_path / "prepared", Timings("prepare"))
    table = pq.read_table(tmp_path / "prepared" / PREPARED_FILE)
    texts = read_texts(source)
    chosen = choose(len(texts), 5, 3)
    assert table["text_index"].to_pylist() == chosen
    assert table["text"].to_pylist() == [texts[i] for i in chosen]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    want = [tokenizer(texts[i])["input_ids"][:12] for i in chosen]
    ids, meta = read_prepared(tmp_path / "prepared")
    assert ids == want and table["n_tokens"].to_pylist() == [len(s) for s in want]
    assert meta["n_available"] == str(len(texts)) and meta["n_texts"] == "5"
    assert meta["n_tokens"] == str(sum(map(len, want))) and meta["text_sha256"] == text_set_hash(want)
    assert json.loads(meta["params"])["seed"] == 3 and meta["source"] == str(source)
    saved = AutoTokenizer.from_pretrained(tmp_path / "prepared" / TOKENIZER_DIR)
    assert [saved(texts[i])["input_ids"][:12] for i in chosen] == want
