"""Bad input ends in one clear line: `Error: ...`, exit status 1, no traceback, and the
outputs of an earlier run left byte-identical.

Bad params, bad texts and bad models, each through the stage a user would run. The faults
that strike during a run (NaN, out of memory, Ctrl-C, SIGKILL, corrupt shards) are in
test_faults.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _cli import assert_error, earlier_run, invoke, snapshot, write_params_file
from _tiny import CORPUS, tiny_params
from critical_weights.config.params import DEVICES, DTYPES, METRICS, PERTURBATIONS, RANK_MODES
from critical_weights.core.errors import ModelError, TextsError
from critical_weights.model import loading, tokenization
from critical_weights.model.source import HUB_TIMEOUT_S, resolve_source

ALL_METRICS = ", ".join(METRICS)
SECTIONS = "seed, texts, model, sensitivity, rank, plot, validate, superweights, compress, quantize, domains"
KINDS = "smollm2-135m, a .gguf file, a model folder in Hugging Face format, or a hub id owner/name"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    """An earlier, successful run: params.yaml, prepared/ and sensitivity/ of the tiny model."""
    folder = tmp_path_factory.mktemp("earlier-run")
    earlier_run(folder, tiny_model_dir)
    return folder


def params_with(run: Path, tmp_path: Path, **sections: dict) -> Path:
    """The earlier run's params.yaml with some keys changed, written to tmp_path."""
    import yaml

    raw = yaml.safe_load((run / "params.yaml").read_text(encoding="utf-8"))
    for section, fields in sections.items():
        if isinstance(fields, dict) and isinstance(raw.get(section), dict):
            raw[section].update(fields)
        else:
            raw[section] = fields
    return write_params_file(tmp_path / "params.yaml", raw)


def prepare(run: Path, params: Path, source: Path = CORPUS):
    """The prepare stage, writing over the earlier run's prepared/."""
    return invoke("prepare", "--params", params, "--source", source, "--out", run / "prepared")


def sensitivity(run: Path, params: Path):
    """The sensitivity stage, writing over the earlier run's sensitivity/."""
    return invoke("sensitivity", "--params", params, "--prepared", run / "prepared", "--out", run / "sensitivity")


@pytest.fixture
def untouched(run):
    """Asserts, after the test, that the earlier run's outputs are byte-identical."""
    before = snapshot(run)
    yield
    assert snapshot(run) == before, "a failed stage changed an earlier output"


# ----------------------------------------------------------------------------- params


def test_every_bad_param_is_reported_at_once_before_any_work(run, tmp_path, untouched):
    params = params_with(
        run, tmp_path,
        texts={"n_texts": 0, "max_length": 1, "sorce": "x.jsonl"},
        model={"dtype": "float8", "device": "tpu"},
        sensitivity={"metrics": ["grad_x_weight", "saliency"], "micro_batch_size": 0, "keep": "many"},
        rank={"mode": "per_head", "k": -1},
        validate={"perturbations": ["zero", "melt"]},
        sed=42,
    )
    result = prepare(run, params)
    assert_error(result, "invalid params.yaml: " + "; ".join([
        "texts.n_texts: 0 must be an integer >= 1",
        "texts.max_length: 1 must be an integer >= 2",
        "texts.sorce: unknown key (did you mean texts.source?); known keys here are max_length, n_texts, source",
        f"model.dtype: 'float8' is not one of {', '.join(DTYPES)} (did you mean float32?)",
        f"model.device: 'tpu' is not one of {', '.join(DEVICES)} (did you mean cpu?)",
        f"sensitivity.metrics: 'saliency' not one of {ALL_METRICS}",
        "sensitivity.micro_batch_size: 0 must be an integer >= 1",
        "sensitivity.keep: 'many' is not an integer",
        f"rank.mode: 'per_head' is not one of {', '.join(RANK_MODES)}",
        "rank.k: -1 must be an integer >= 1",
        f"validate.perturbations: 'melt' not one of {', '.join(PERTURBATIONS)}",
        f"sed: unknown key (did you mean seed?); known keys here are {', '.join(sorted(SECTIONS.split(', ')))}",
    ]))


def test_k_above_keep_and_an_uncomputed_metric(run, tmp_path, untouched):
    params = params_with(run, tmp_path, sensitivity={"keep": 5, "metrics": ["magnitude"]},
                         rank={"k": 6, "metric": "fisher"}, validate={"k_values": [1]},
                         domains={"top_n": 5, "per_tensor_k": 5})
    assert_error(prepare(run, params), (
        "invalid params.yaml: rank.metric: 'fisher' is not computed; sensitivity.metrics has magnitude; "
        "rank.k: 6 exceeds sensitivity.keep 5; raise sensitivity.keep so the ranking stays exact"))


@pytest.mark.parametrize("text, problem", [
    ("- seed\n- texts\n", f"top level: ['seed', 'texts'] is not a mapping; expected the sections {SECTIONS}"),
    ("just words\n", f"top level: 'just words' is not a mapping; expected the sections {SECTIONS}"),
    ("rank: [unclosed\n", "{path}: is not valid YAML (expected ',' or ']', but got '<stream end>' at line 2, column 1)"),
    ("seed: 1\nrank:\n  k: 1\n\tmode: global\n",
     "{path}: is not valid YAML (found character '\\t' that cannot start any token at line 4, column 1)"),
    ("seed: 1\nseed: 2\n", "{path}: is not valid YAML (key seed appears twice in one mapping at line 2, column 1)"),
    ("", f"{{path}}: is empty; expected a mapping of the sections {SECTIONS}"),
    ("# only a comment\n", f"{{path}}: is empty; expected a mapping of the sections {SECTIONS}"),
])
def test_params_file_that_is_not_a_mapping_of_sections(run, tmp_path, untouched, text, problem):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    assert_error(prepare(run, path), "invalid params.yaml: " + problem.format(path=path))


def test_params_file_that_is_not_utf8(run, tmp_path, untouched):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 42\nmodel:\n  name: caf\xe9\n")
    assert_error(prepare(run, path), f"invalid params.yaml: {path}: is not UTF-8 text (bad byte at offset 27)")


def test_huge_aliased_value_is_shown_short(run, tmp_path, untouched):
    """A 'billion laughs' value must not hang or flood the message: it is shown bounded."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]" for p, c in zip("abcdefgh", "bcdefghi")]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\nmodel:\n  name: *i\n", encoding="utf-8")
    start = time.perf_counter()
    result = prepare(run, path)
    assert time.perf_counter() - start < 10
    last = result.output.rstrip("\n").splitlines()[-1]
    assert last.startswith("Error: invalid params.yaml: model.name: [[[[...], [...], [...], [...], [...], [...], ...], ")
    assert " must be a non-empty string; a: unknown key; known keys here are " in last
    assert len(last) < 4000 and result.exit_code == 1 and "Traceback" not in result.output


@no_cuda
def test_cuda_on_a_machine_without_cuda_fails_before_reading_anything(run, tmp_path, untouched):
    params = params_with(run, tmp_path, model={"device": "cuda"})
    empty = tmp_path / "no-prepared-texts"
    empty.mkdir()  # were anything read first, the error would be about these missing texts
    result = invoke("sensitivity", "--params", params, "--prepared", empty, "--out", run / "sensitivity")
    assert_error(result, "invalid params.yaml: model.device: 'cuda' but no CUDA device is visible on this machine; "
                         "allowed here: auto, cpu")


@no_cuda
@pytest.mark.parametrize("model, problems", [
    ({"device": "cpu", "dtype": "float16"},
     ["model.dtype: 'float16' is not supported on the CPU; allowed here: auto, float32, bfloat16"]),
    ({"device": "auto", "dtype": "float16"},
     ["model.dtype: 'float16' is not supported on the CPU; allowed here: auto, float32, bfloat16"]),
    ({"device": "auto", "device_map": "auto"},
     ["model.device_map: 'auto' spreads the model over GPUs, but no CUDA device is visible; allowed here: none"]),
])
def test_settings_this_machine_cannot_honour(run, tmp_path, untouched, model, problems):
    params = params_with(run, tmp_path, model=model)
    empty = tmp_path / "no-prepared-texts"
    empty.mkdir()
    result = invoke("sensitivity", "--params", params, "--prepared", empty, "--out", run / "sensitivity")
    assert_error(result, "invalid params.yaml: " + "; ".join(problems))


# ----------------------------------------------------------------------------- texts


def _jsonl(*records: object) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "{path} does not exist; expected .jsonl, .txt, .parquet, or a folder of .txt files"),
    ("texts.csv", b"text\nhello world\n", "{path} has an unsupported type; expected .jsonl, .txt, .parquet, or a folder of .txt files"),
    ("empty.txt", b"", "{path} holds no non-empty text"),
    ("blank.jsonl", _jsonl({"text": "  "}, {"text": ""}), "{path} holds no non-empty text"),
    ("latin1.txt", "première ligne\n".encode("latin-1"), "{path} is not UTF-8 (bad byte at offset 5)"),
    ("binary.txt", bytes(range(256)), "{path} looks binary (it holds NUL bytes); expected UTF-8 text"),
    ("nofield.jsonl", _jsonl({"text": "a fine text"}, {"body": "no text field"}), "{path} line 2 has no string field 'text'"),
    ("number.jsonl", _jsonl({"text": 42}), "{path} line 1 has no string field 'text'"),
    ("list.jsonl", _jsonl(["text", "in a list"]), "{path} line 1 has no string field 'text'"),
    ("broken.jsonl", _jsonl({"text": "one"}, "", '{"text": "three'),
     "{path} line 3 is not valid JSON (Unterminated string starting at)"),
    ("parquet.parquet", b"PAR1 this is not parquet at all",
     "{path} is not a readable Parquet file (Parquet magic bytes not "
     "found in footer. Either the file is corrupted or this is not a parquet file.)"),
])
def test_bad_text_source(run, tmp_path, untouched, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = prepare(run, run / "params.yaml", source=path)
    assert_error(result, "texts.source: " + message.format(path=path))


def test_parquet_without_a_text_column(run, tmp_path, untouched):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["a b c", "d e f"]}), path)
    assert_error(prepare(run, run / "params.yaml", source=path),
                 f"texts.source: {path} has no string column 'text' (columns: id, body)")


def test_texts_all_too_short_after_tokenisation(run, tmp_path, untouched):
    path = tmp_path / "short.txt"
    path.write_text("the\nof\nand\n", encoding="utf-8")  # one token each with the tiny word-level tokenizer
    assert_error(prepare(run, run / "params.yaml", source=path),
                 "texts.source: all 3 chosen texts are shorter than 2 tokens after tokenisation, "
                 "so there is nothing to predict; use longer texts")


def test_fewer_texts_than_n_texts_uses_all_with_a_warning(run, tmp_path, caplog):
    """Not an error: every text is used, a warning says so, and the real count is recorded."""
    from critical_weights.artifacts.prepared_texts import read_prepared_meta

    path = tmp_path / "three.jsonl"
    path.write_bytes(_jsonl({"text": "the cat sat on the mat"}, {"text": "a dog ran in the park"},
                            {"text": "water boils at one hundred degrees"}))
    out = tmp_path / "prepared"
    result = invoke("prepare", "--params", run / "params.yaml", "--source", path, "--out", out)
    assert result.exit_code == 0, result.output
    assert "texts.n_texts is 8 but the source holds 3 texts; using all 3" in caplog.text
    meta = read_prepared_meta(out)
    assert (meta["n_texts"], meta["n_available"]) == ("3", "3")


def test_jsonl_line_numbers_count_only_newlines(tmp_path):
    """U+2028 inside a JSON string is text, not a line break; a byte-order mark is not text."""
    from critical_weights.texts.sources import read_texts

    path = tmp_path / "texts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl({"text": "one\u2028line"}, {"text": "two"}, "{broken"))
    with pytest.raises(TextsError) as info:
        read_texts(path)
    assert str(info.value) == f"texts.source: {path} line 3 is not valid JSON (Expecting property name enclosed in double quotes)"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl({"text": "one\u2028line"}, {"text": "two"}))
    assert read_texts(path) == ["one\u2028line", "two"]


# ----------------------------------------------------------------------------- models


def _copy_model(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return dst


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Model folders and files that are wrong in one way each."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bad-models")
    out: dict[str, Path] = {}

    out["no-weights"] = _copy_model(tiny_model_dir, root / "no-weights", drop=("*.safetensors",))

    out["truncated"] = _copy_model(tiny_model_dir, root / "truncated")
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    (out["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])

    out["garbage"] = _copy_model(tiny_model_dir, root / "garbage")
    (out["garbage"] / "model.safetensors").write_bytes(b"this is no safetensors file")

    out["bad-config"] = _copy_model(tiny_model_dir, root / "bad-config")
    (out["bad-config"] / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")

    out["pickle"] = _copy_model(tiny_model_dir, root / "pickle", drop=("*.safetensors",))
    torch.save(load_file(tiny_model_dir / "model.safetensors"), out["pickle"] / "pytorch_model.bin")

    out["nan"] = _copy_model(tiny_model_dir, root / "nan")
    weights = load_file(tiny_model_dir / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(weights, out["nan"] / "model.safetensors", metadata={"format": "pt"})

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8, max_position_embeddings=16))
    out["bert"] = root / "bert"
    bert.save_pretrained(out["bert"])

    out["remote"] = _copy_model(tiny_model_dir, root / "remote")
    config = json.loads((out["remote"] / "config.json").read_text(encoding="utf-8"))
    config.update(model_type="shady", architectures=["ShadyForCausalLM"],
                  auto_map={"AutoConfig": "configuration_shady.ShadyConfig",
                            "AutoModelForCausalLM": "modeling_shady.ShadyForCausalLM"})
    (out["remote"] / "config.json").write_text(json.dumps(config), encoding="utf-8")
    marker = root / "remote-code-ran"
    for module in ("configuration_shady", "modeling_shady"):
        (out["remote"] / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n", encoding="utf-8")

    out["gguf"] = _tiny_gguf(root / "small.gguf")
    gguf_bytes = out["gguf"].read_bytes()
    out["gguf-truncated"] = root / "truncated.gguf"
    out["gguf-truncated"].write_bytes(gguf_bytes[: len(gguf_bytes) - 48])
    out["gguf-header"] = root / "header.gguf"
    out["gguf-header"].write_bytes(gguf_bytes[:40])
    out["gguf-garbage"] = root / "garbage.gguf"
    out["gguf-garbage"].write_bytes(b"GGML" + gguf_bytes[4:])
    out["gguf-empty"] = root / "empty.gguf"
    out["gguf-empty"].write_bytes(b"")
    out["a-bin-file"] = root / "model.bin"
    out["a-bin-file"].write_bytes(b"\x80\x04pickle")
    return out


def _tiny_gguf(path: Path) -> Path:
    """A small, valid GGUF file (two float32 tensors); not a model transformers can load."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones((4,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


MODEL_CASES = {
    "no-weights": "model.name: {path} holds no weights (no *.safetensors or pytorch_model.bin)",
    "truncated": "model.name: {path}/model.safetensors is not a valid safetensors file (its tensors need {size} bytes "
                 "but the file holds {half}; truncated); replace it with a complete copy",
    "garbage": "model.name: {path}/model.safetensors is not a valid safetensors file (its header claims "
               "{claim} bytes but the file holds 27; truncated or not safetensors); replace it with a complete copy",
    "bad-config": "model.name: {path}/config.json is not valid JSON (Expecting property name enclosed in double quotes: "
                  "line 1 column 24 (char 23))",
    "pickle": "model.name: {path} holds only pickle weights (pytorch_model.bin), which can run code; "
              "convert them to safetensors or set model.allow_pickle: true",
    "bert": "model.name: {path} is a BertModel, not a causal language model; expected an architecture such as "
            "LlamaForCausalLM (one that predicts the next token)",
    "remote": "model.name: {path} needs its own Python code (modeling_shady.ShadyForCausalLM, from auto_map in "
              "config.json), which never runs unless model.trust_remote_code: true",
    "gguf-truncated": "model.name: {path} is not a valid GGUF file (its tensors need {gguf_need} bytes but the file "
                      "holds {gguf_cut}; truncated); replace it with a complete copy",
    "gguf-header": "model.name: {path} is not a valid GGUF file (it ends inside its header; truncated); "
                   "replace it with a complete copy",
    "gguf-garbage": "model.name: {path} is not a valid GGUF file (it does not start with the GGUF magic bytes); "
                    "replace it with a complete copy",
    "gguf-empty": "model.name: {path} is not a valid GGUF file (it is empty); replace it with a complete copy",
    "a-bin-file": "model.name: '{path}' is a file of another kind; expected " + KINDS,
    "nowhere": "model.name: '{path}' does not exist; expected " + KINDS,
    "nowhere.gguf": "model.name: {path} does not exist; expected " + KINDS,
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_fails_in_prepare_naming_it(run, tmp_path, untouched, bad_models, tiny_model_dir, case):
    path = bad_models.get(case, tmp_path / case)
    size = (tiny_model_dir / "model.safetensors").stat().st_size
    gguf_size = bad_models["gguf"].stat().st_size
    message = MODEL_CASES[case].format(path=path, size=size, half=size // 2, gguf_need=gguf_size - 16,
                                       gguf_cut=gguf_size - 48, claim=int.from_bytes(b"this is ", "little"))
    params = params_with(run, tmp_path, model={"name": str(path)})
    assert_error(prepare(run, params), message)
    assert not (path.parent / "remote-code-ran").exists(), "the model's own code ran"


def test_pickle_loads_when_allowed(bad_models):
    params = dataclasses.replace(tiny_params(bad_models["pickle"]).model, allow_pickle=True)
    source = resolve_source(str(bad_models["pickle"]))
    model = loading.load_model(source, params, torch.device("cpu"), torch.float32)
    assert model.config.architectures == ["LlamaForCausalLM"]


def test_nan_or_inf_weights_fail_at_load_naming_the_parameter(run, tmp_path, untouched, bad_models):
    params = params_with(run, tmp_path, model={"name": str(bad_models["nan"])})
    assert_error(sensitivity(run, params), (
        f"model.name: {bad_models['nan']}: parameter model.layers.1.mlp.down_proj.weight holds 2 NaN or infinite "
        "weight(s) of 512; the checkpoint is corrupt"))


# ----------------------------------------------------------------------------- the hub, offline


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_with_hf_hub_offline_fails_at_once(empty_hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ModelError) as info:
        resolve_source("someone/some-model")
    assert time.perf_counter() - start < 5
    assert str(info.value) == (
        "model.name: 'someone/some-model' is neither a local folder nor in the local Hugging Face cache, and "
        "HF_HUB_OFFLINE is set; download it once while online, or name a local model folder")


def test_hub_id_when_the_hub_cannot_be_reached_fails_in_seconds(run, tmp_path, untouched, empty_hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import HTTPError

    calls = []

    def unreachable(repo_id, **kwargs):
        calls.append(kwargs.get("timeout"))
        raise HTTPError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    params = params_with(run, tmp_path, model={"name": "someone/some-model"})
    start = time.perf_counter()
    result = prepare(run, params)
    assert time.perf_counter() - start < 10
    assert calls == [HUB_TIMEOUT_S]  # one look-up, with a short timeout, no retries
    assert_error(result, (
        "model.name: 'someone/some-model' is neither a local folder nor in the local Hugging Face cache, and the hub "
        "cannot be reached: [Errno -2] Name or service not known; download it once while online, or name a local "
        "model folder"))


def test_hub_id_in_the_local_cache_loads_offline(empty_hub_cache, monkeypatch, tiny_model_dir):
    """Offline, a model downloaded earlier still loads, from the cache alone."""
    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--someone--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha, encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    params = dataclasses.replace(tiny_params(tiny_model_dir).model, name="someone/tiny")
    source = resolve_source("someone/tiny")
    assert (source.kind, source.local_only) == ("hub", True)
    assert tokenization.load_tokenizer(source, params)("the cat")["input_ids"]
    model = loading.load_model(source, params, torch.device("cpu"), torch.float32)
    assert model.config.architectures == ["LlamaForCausalLM"]


def test_out_of_memory_when_every_long_text_has_a_micro_batch_of_its_own():
    """With the defaults (micro-batch 8, budget 256) a 256-token text is alone: halving either
    would not help, so the advice is the one for a single sequence."""
    from critical_weights.core.errors import out_of_memory

    assert str(out_of_memory(8, 256, 256)) == (
        "out of device memory in forward+backward even for one sequence of 256 tokens "
        "(sensitivity.micro_batch_size 8, sensitivity.batch_tokens 256); lower texts.max_length, "
        "use model.dtype bfloat16, or spread the model with model.device_map auto")
    assert "try 4" in str(out_of_memory(8, 512, 100))  # short texts still share a micro-batch
