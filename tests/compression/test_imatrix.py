"""The importance matrix: a GGUF file llama.cpp's format describes, read back with the gguf
package, holding the sums of x² (or, as a variant, Fisher's column sums) under the model's
GGUF names, with the embedded default's names checked against its own GGUF file; and the
bf16 scores export."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from _tiny import run_prepare_and_sensitivity, tiny_params
from critical_weights.artifacts import shards
from critical_weights.artifacts.sums import Sums
from critical_weights.compression.imatrix import gguf_name, name_map
from critical_weights.compression.stage import Outputs, run_compress
from critical_weights.core.progress import Timings
from critical_weights.core.errors import ModelError, ParamsError
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


def test_the_fisher_variant_and_bf16_scores_read_back(tmp_path_factory, tiny_model_dir):
    params = tiny_params(tiny_model_dir, sensitivity={"metrics": ("fisher",), "dense": False},
                         rank={"metric": "fisher"},
                         compress={"sparsities": (0.5,), "structures": ("unstructured",), "n_texts": 2,
                                   "imatrix": False, "imatrix_fisher": True, "scores": "bfloat16"})
    folder = tmp_path_factory.mktemp("fisher")
    prepared, sens = run_prepare_and_sensitivity(folder, params)
    out = Outputs(folder / "c.json", folder / "r.json", folder / "p.csv", folder / "p.png", folder / "exports")
    report = run_compress(prepared, sens, Path(params.texts.source), params, out, Timings("compress"))
    assert sorted(p.name for p in out.exports.iterdir()) == ["imatrix_fisher.gguf", "masks.safetensors", "scores.safetensors"]
    sums, meta = Sums(sens), shards.read_meta(sens)
    n = meta["n_sequences"]
    tensors = {t.name: t for t in gguf.GGUFReader(str(out.exports / "imatrix_fisher.gguf")).tensors}
    fisher = sums.get("fisher", "model.layers.1.mlp.down_proj.weight")  # (out 16, in 32)
    got = np.asarray(tensors["blk.1.ffn_down.weight.in_sum2"].data).reshape(-1)
    counts = np.asarray(tensors["blk.1.ffn_down.weight.counts"].data).reshape(-1)
    assert counts.tolist() == [n]
    np.testing.assert_allclose(got / counts[0], fisher.astype(np.float64).sum(axis=0), rtol=1e-6)
    assert report["imatrix_fisher"]["statistic"] == "fisher" and report["imatrix"] is None
    with safe_open(out.exports / "scores.safetensors", "pt") as f:
        assert f.metadata()["metric"] == "fisher" and f.metadata()["dtype"] == "bfloat16"
        assert set(f.keys()) == set(report["pruned"]["tensors"])
        score = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert score.dtype == torch.bfloat16
    assert torch.equal(score, torch.from_numpy(fisher).to(torch.bfloat16))  # fisher's score is the Fisher sum itself


def test_the_fisher_variant_without_fisher_is_a_one_line_error(compressed):
    report, out, params, _ = compressed
    asked = replace(params, compress=replace(params.compress, imatrix_fisher=True))
    folder = out.exports.parent
    with pytest.raises(ParamsError, match="compress.imatrix_fisher: the gradient-weighted importance matrix needs the "
                                          "Fisher sums, which this run did not compute; add fisher"):
        run_compress(folder / "prepared", folder / "sensitivity", Path(params.texts.source), asked,
                     Outputs(*(folder / "x" / n for n in ("c.json", "r.json", "p.csv", "p.png", "e"))), Timings("compress"))
