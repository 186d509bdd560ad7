"""The GGUF cache: a cached load gives bit-identical weights and the same tokenizer as a direct
GGUF load, is keyed by the file's sha256, survives two runs converting at once, and falls back
to a direct load (said in the log) when the cache folder cannot be written."""

from __future__ import annotations

import filecmp
import logging
from pathlib import Path

import pytest
import torch

from _gguf import write_tiny_gguf
from critical_weights.config.params import ModelParams
from critical_weights.model import gguf_cache, loading, tokenization
from critical_weights.model.source import resolve_source

TEXT = "Weights that matter: 3.14, naïve café, def f(x): return x"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _load(path: Path, dtype: torch.dtype = torch.float32):
    params = ModelParams(name=str(path), device="cpu")
    source = resolve_source(params.name)
    return tokenization.load_tokenizer(source, params), loading.load_model(source, params, torch.device("cpu"), dtype)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name].view(torch.uint8), sb[name].view(torch.uint8)), name  # bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_load_is_bit_identical_to_a_direct_gguf_load(tiny_gguf, tmp_path, monkeypatch, caplog, dtype):
    monkeypatch.setenv(gguf_cache.ENV, "off")
    tok_direct, direct = _load(tiny_gguf, dtype)
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="critical_weights.model.gguf_cache"):
        tok_first, first = _load(tiny_gguf, dtype)  # converts into the cache
        assert caplog.text.count("converting once into the cache") == 2  # model and tokenizer
        caplog.clear()
        tok_again, again = _load(tiny_gguf, dtype)  # reads the cache
        assert caplog.text.count("from the cache") == 2 and "converting" not in caplog.text
    for model in (first, again):
        _assert_same_weights(direct, model)
    assert direct.config.tie_word_embeddings == again.config.tie_word_embeddings
    for tok in (tok_first, tok_again):
        assert tok(TEXT)["input_ids"] == tok_direct(TEXT)["input_ids"]
    saved = [tmp_path / name for name in ("direct", "cached")]
    tok_direct.save_pretrained(saved[0])
    tok_again.save_pretrained(saved[1])
    files = sorted(p.name for p in saved[0].iterdir())
    assert files == sorted(p.name for p in saved[1].iterdir())
    assert filecmp.cmpfiles(*saved, files, shallow=False)[0] == files  # what prepare writes is unchanged


def test_cache_entry_is_keyed_by_the_sha256_and_holds_whole_parts(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path))
    _load(tiny_gguf)
    (entry,) = tmp_path.iterdir()
    assert entry.name.startswith(f"gguf-{gguf_cache.sha256_file(tiny_gguf)}-transformers")
    assert sorted(p.name for p in entry.iterdir()) == ["model", "tokenizer"]  # no temporary folder left
    assert (entry / "model" / "model.safetensors").is_file() and (entry / "model" / gguf_cache.COMPLETE).is_file()
    other = write_tiny_gguf(tmp_path.parent / "other.gguf", seed=1)  # other bytes, other entry
    _load(other)
    assert len(list(tmp_path.iterdir())) == 2


def test_two_runs_converting_at_once_both_get_a_whole_part(tmp_path, monkeypatch, caplog):
    """The second run's rename finds the part already there: it drops its own copy and uses
    the first run's. Here the "other run" finishes inside this run's build, deterministically."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF bytes stand-in")
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path / "cache"))

    def build(mine: str):
        def write(folder: Path) -> None:
            if mine == "slow":
                assert gguf_cache.cached_part(gguf, "model", build("fast")) is not None
            (folder / "weights").write_text(mine)
        return write

    with caplog.at_level(logging.INFO, logger="critical_weights.model.gguf_cache"):
        part = gguf_cache.cached_part(gguf, "model", build("slow"))
    assert "another run cached it first" in caplog.text
    assert (part / "weights").read_text() == "fast"
    assert sorted(p.name for p in part.parent.iterdir()) == ["model"]  # the loser's copy is gone


def test_unwritable_cache_falls_back_to_a_direct_load(tiny_gguf, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(gguf_cache.ENV, str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="critical_weights.model.gguf_cache"):
        tok, model = _load(tiny_gguf)
    assert "cannot be written" in caplog.text and "without caching it" in caplog.text
    monkeypatch.setenv(gguf_cache.ENV, "off")
    _, direct = _load(tiny_gguf)
    _assert_same_weights(direct, model)


def test_cache_off_writes_nothing(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.ENV, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gguf_cache.cache_root() is None
    _load(tiny_gguf)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_folder_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv(gguf_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gguf_cache.cache_root() == tmp_path / "critical-weights"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gguf_cache.cache_root() == tmp_path / ".cache" / "critical-weights"
