"""Convert a GGUF file once: its dequantised weights and its tokenizer, cached on disk.

transformers dequantises a GGUF file to float32 in Python and rebuilds its tokenizer from the
vocabulary, which takes tens of seconds per stage. The result depends only on the file's bytes
and on the versions of transformers and gguf, so it is converted once and kept in the user's
cache folder, keyed by the GGUF's sha256:

    $CRITICAL_WEIGHTS_CACHE, else $XDG_CACHE_HOME/critical-weights, else ~/.cache/critical-weights
        gguf-<sha256>-transformers<v>-gguf<v>/
            model/       config.json + model.safetensors (float32, as dequantised)
            tokenizer/   the tokenizer's own files

Each part is written into a temporary folder and renamed into place, so a reader sees either
no part or a whole one, and two runs converting at once (`dvc queue start -j 2`) both end
with the same complete part (the second rename loses and its copy is dropped). The weights
are stored in float32, as gguf dequantises them, and cast to `model.dtype` on load, exactly
as a direct GGUF load casts them. `CRITICAL_WEIGHTS_CACHE=off` turns the cache off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from critical_weights.core.outputs import remove_stale

log = logging.getLogger(__name__)

ENV = "CRITICAL_WEIGHTS_CACHE"
FORMAT = 1  # bump when the layout of an entry changes
COMPLETE = "complete.json"  # written last inside a part, before the rename


def cache_root() -> Path | None:
    """The cache folder, or None when the user turned the cache off."""
    chosen = os.environ.get(ENV)
    if chosen is not None and chosen.lower() in ("off", "0", "none", ""):
        return None
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "critical-weights"


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """The file's sha256, computed once per process for an unchanged file."""
    st = Path(path).stat()
    return _sha256(Path(path).resolve(), st.st_size, st.st_mtime_ns)


def entry_name(gguf: Path) -> str:
    """The cache entry of a GGUF file: its bytes and the converters' versions."""
    versions = f"transformers{_version('transformers')}-gguf{_version('gguf')}"
    return f"gguf-{sha256_file(gguf)}-{versions}"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def cached_part(gguf: Path, part: str, build: Callable[[Path], None]) -> Path | None:
    """The folder holding `part` ("model" or "tokenizer") of `gguf`, built by `build(folder)` if
    absent. None when the cache is off or its folder cannot be written (said in the log)."""
    root = cache_root()
    if root is None:
        return None
    entry = root / entry_name(gguf)
    target = entry / part
    if (target / COMPLETE).is_file():
        log.info("%s of %s: from the cache %s", part, gguf.name, entry)
        return target
    try:
        entry.mkdir(parents=True, exist_ok=True)
        remove_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{part}.{os.getpid()}.", suffix=".tmp", dir=entry))
    except OSError as err:
        log.warning("the cache folder %s cannot be written (%s); converting %s without caching it",
                    root, err.strerror or err, gguf.name)
        return None
    try:
        log.info("%s of %s: converting once into the cache %s", part, gguf.name, entry)
        build(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"gguf": gguf.name, "part": part, "format": FORMAT}) + "\n")
        os.rename(tmp, target)
    except OSError as err:
        if (target / COMPLETE).is_file():
            log.info("%s of %s: another run cached it first; using that copy", part, gguf.name)
        else:
            log.warning("the cache %s cannot be written (%s); loading %s without it", entry, err.strerror or err, gguf.name)
            return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.cache
def memoise_name_maps() -> None:
    """Speed up transformers' GGUF loading, which spends most of its time in Python:
    - it rebuilds gguf's tensor-name map once per tensor, though the map depends only on
      (architecture, n_blocks);
    - it parses the whole file (vocabulary included) once for the config and again for the
      weights.
    Both are pure functions of their arguments, so memoise them for this process."""
    try:
        import gguf
    except ImportError:
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(gguf.GGUFReader)
