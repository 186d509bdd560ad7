"""The importance matrix: a GGUF file llama.cpp's format describes, read back with the gguf
package, holding the sums of x² under the model's GGUF names, with the embedded default's
names checked against its own GGUF file."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest

from _tiny import run_prepare_and_sensitivity, tiny_params
from critical_weights.artifacts import shards
from critical_weights.artifacts.sums import Sums
from critical_weights.compression.imatrix import gguf_name, name_map
from critical_weights.compression.stage import Outputs, run_compress
from critical_weights.core.progress import Timings
from critical_weights.core.errors import ModelError
from critical_weights.model.source import resolve_source


def test_the_file_reads_back_with_the_sums_under_gguf_names(compressed):
    report, out, params, _ = compressed
    reader = gguf.GGUFReader(str(out.exports / "imatrix.gguf"))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(fields["imatrix.chunk_size"].parts[-1][0]) == params.texts.max_length
    tensors = {t.name: t for t in reader.tensors}
    sums = Sums(out.exports.parent / "sensitivity")
    meta = shards.read_meta(out.exports.parent / "sensitivity")
    tokens = meta["n_tokens"] + meta["n_sequences"]
    q = "blk.0.attn_q.weight"
    assert np.asarray(tensors[f"{q}.in_sum2"].data).reshape(-1).tobytes() == \
        sums.get("act_sq", "model.layers.0.self_attn.q_proj.weight").tobytes()
    assert list(tensors[f"{q}.in_sum2"].shape) == [16, 1], "GGUF order: (in, n_mat)"
    assert float(np.asarray(tensors[f"{q}.counts"].data).reshape(-1)[0]) == tokens
    names = {n.rpartition(".")[0] for n in tensors}
    assert names == {f"blk.{b}.{c}.weight" for b in (0, 1) for c in
                     ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")} | {"output.weight"}
    assert report["imatrix"]["n_tensors"] == len(names)
    assert report["imatrix"]["left_out"] == {}, "the untied tiny model has no embedding act_sq to leave out"


def test_every_gguf_name_of_the_embedded_default_is_a_tensor_of_its_own_file():
    (path,) = resolve_source("smollm2-135m").weight_files
    reader = gguf.GGUFReader(str(path))
    theirs = {t.name for t in reader.tensors}
    n_blocks = int(reader.fields["llama.block_count"].parts[-1][0])
    names = name_map("llama", n_blocks)
    ours = [gguf_name(names, f"model.layers.{b}.{c}.weight") for b in range(n_blocks) for c in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert len(ours) == 7 * n_blocks == 210
    assert set(ours) <= theirs, sorted(set(ours) - theirs)[:3]


def test_a_model_with_no_gguf_mapping_is_a_one_line_error():
    with pytest.raises(ModelError, match="model type 'no_such_model' has no GGUF name mapping in the gguf package; "
                                         "set compress.imatrix false"):
        name_map("no_such_model", 2)


def test_without_wanda_the_file_is_not_written_and_the_report_says_why(tmp_path_factory, tiny_model_dir, caplog):
    params = tiny_params(tiny_model_dir, sensitivity={"metrics": ("grad_x_weight",), "dense": False},
                         compress={"sparsities": (0.5,), "structures": ("unstructured",), "n_texts": 2})
    folder = tmp_path_factory.mktemp("no_wanda")
    prepared, sens = run_prepare_and_sensitivity(folder, params)
    out = Outputs(folder / "c.json", folder / "r.json", folder / "p.csv", folder / "p.png", folder / "exports")
    with caplog.at_level(logging.WARNING):
        report = run_compress(prepared, sens, Path(params.texts.source), params, out, Timings("compress"))
    assert report["imatrix"]["file"] is None and "add wanda to sensitivity.metrics" in report["imatrix"]["reason"]
    assert "compress.imatrix: not written" in caplog.text
    assert sorted(p.name for p in out.exports.iterdir()) == ["masks.safetensors"]
