"""Loading tokenizers: the torch-free path for a plain tokenizer folder gives exactly what
AutoTokenizer gives, other folders still go through AutoTokenizer, and `prepare` on a GGUF
model with a cached tokenizer never imports torch (1.5 s of start-up it does not need)."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _gguf import write_tiny_gguf
from _tiny import CORPUS, build_tokenizer
from critical_weights.config.params import ModelParams
from critical_weights.model import gguf_cache, tokenization
from critical_weights.core.errors import ModelError
from critical_weights.model.source import ModelSource, resolve_source

TEXTS = ["Weights that matter: 3.14, naïve café, def f(x): return x", "  two  spaces\tand a tab\n", ""]


@pytest.fixture(scope="module")
def cached_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny GGUF and a cache folder that already holds its converted tokenizer."""
    folder = tmp_path_factory.mktemp("tok")
    gguf, cache = write_tiny_gguf(folder / "tiny.gguf"), folder / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gguf_cache.ENV, str(cache))
        tokenization.load_tokenizer(resolve_source(str(gguf)), ModelParams(name=str(gguf)))
    return gguf, cache


def _saved_folder(cache: Path) -> Path:
    (entry,) = cache.iterdir()
    return entry / "tokenizer"


def test_plain_folder_loads_as_auto_tokenizer_would(cached_gguf, tmp_path):
    from transformers import AutoTokenizer

    folder = _saved_folder(cached_gguf[1])
    fast, auto = tokenization.load_saved(folder), AutoTokenizer.from_pretrained(folder)
    assert type(fast) is type(auto) and type(fast).__name__ == tokenization.PLAIN_CLASS
    for text in TEXTS:
        assert fast(text)["input_ids"] == auto(text)["input_ids"]
    ids = auto(TEXTS[0])["input_ids"]
    assert fast.decode(ids) == auto.decode(ids) and fast.special_tokens_map == auto.special_tokens_map
    fast.save_pretrained(tmp_path / "fast")
    auto.save_pretrained(tmp_path / "auto")
    files = sorted(p.name for p in (tmp_path / "auto").iterdir())
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == files
    assert filecmp.cmpfiles(tmp_path / "fast", tmp_path / "auto", files, shallow=False)[0] == files


def test_other_folders_go_through_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))
    loaded = tokenization.load_saved(tmp_path)
    assert type(loaded) is type(AutoTokenizer.from_pretrained(tmp_path))
    assert loaded("the cat")["input_ids"] == build_tokenizer()("the cat")["input_ids"]
    (tmp_path / "tokenizer_config.json").unlink()  # no config at all: AutoTokenizer decides
    assert tokenization.load_saved(tmp_path)("the cat")["input_ids"] == loaded("the cat")["input_ids"]


def test_prepare_on_a_gguf_model_never_imports_torch(cached_gguf, tmp_path):
    """The whole prepare stage, in a fresh interpreter, with the tokenizer already cached."""
    gguf, cache = cached_gguf
    script = f"""
import sys
from dataclasses import replace
from pathlib import Path
from critical_weights.config.params import Params
from critical_weights.core.progress import Timings
from critical_weights.texts.stage import run_prepare
p = Params()
p = replace(p, texts=replace(p.texts, source={str(CORPUS)!r}, n_texts=4, max_length=32),
            model=replace(p.model, name={str(gguf)!r}))
run_prepare(Path({str(CORPUS)!r}), p, Path({str(tmp_path / 'prepared')!r}), Timings("prepare"))
print(sorted(m for m in ("torch", "transformers.modeling_utils") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, gguf_cache.ENV: str(cache)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "prepared" / "tokenizer" / "tokenizer.json").is_file()


def test_a_class_that_splits_otherwise_than_the_folders_tokenizer_json_is_one_line(tmp_path):
    """transformers may load a folder's tokenizer as a model-specific class that rebuilds it
    (Qwen2's does); here the stand-in is a tokenizer over a reversed vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    saved = build_tokenizer()
    saved.save_pretrained(tmp_path)
    source = ModelSource("my-model", "directory", str(tmp_path))
    texts = ["The river ran.", "A cat sat on the mat."]
    tokenization.check_against_file(source, saved, texts)  # the file's own class: no complaint
    vocab = saved.get_vocab()
    backwards = Tokenizer(WordLevel(vocab={w: len(vocab) - 1 - i for w, i in vocab.items()}, unk_token="[UNK]"))
    backwards.pre_tokenizer = Whitespace()
    swapped = PreTrainedTokenizerFast(tokenizer_object=backwards, unk_token="[UNK]")
    with pytest.raises(ModelError, match=(
            r"^model.name: my-model: transformers loads its tokenizer as \w+, which splits 2 of 2 "
            r"texts differently from the folder's tokenizer.json; set \"tokenizer_class\": \"TokenizersBackend\" in "
            r"its tokenizer_config.json to use the file as it is$")):
        tokenization.check_against_file(source, swapped, texts)
    tokenization.check_against_file(ModelSource("gguf", "gguf", str(tmp_path)), swapped, texts)  # no file to hold to


def test_the_saved_tokenizer_must_give_the_prepared_ids_again(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    texts = ["The river ran.", "A cat sat on the mat."]
    ids = [tok(t)["input_ids"][:3] for t in texts]
    tokenization.check_reloads(tmp_path, texts, ids, 3)
    with pytest.raises(ModelError, match=r"^prepare: the saved tokenizer reloads as \w+ and tokenises 1 of 2 texts"):
        tokenization.check_reloads(tmp_path, texts, [ids[0], ids[1][:-1]], 3)
