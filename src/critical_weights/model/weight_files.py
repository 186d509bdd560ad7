"""Cheap integrity checks of weight files, before anything is loaded.

A truncated or corrupt checkpoint should fail with one line naming the file, not deep inside
a loader. Both checks read only the file's header and compare the extent of every tensor it
declares with the file's size:
- safetensors: an 8-byte header length, a JSON header, then the tensor bytes, which must
  cover the rest of the file exactly;
- GGUF: magic, version, metadata, a tensor table, then the aligned tensor data, which must
  fit in the file.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

from critical_weights.core.errors import ModelError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_DIMS = 8


class _Truncated(Exception):
    """A read ran past the end of the file."""


class _Cursor:
    """Little-endian reads from a buffer, each checked against its end."""

    def __init__(self, buf: mmap.mmap | bytes):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        self.pos += n

    def unpack(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        start = self.pos
        self.skip(n)
        return struct.unpack_from(fmt, self.buf, start)

    def string(self) -> bytes:
        (n,) = self.unpack("<Q")
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start : start + n])


def _corrupt(path: Path, why: str) -> ModelError:
    return ModelError(f"model.name: {path} is not a valid {_kind(path)} file ({why}); replace it with a complete copy")


def _kind(path: Path) -> str:
    return "GGUF" if path.suffix == ".gguf" else "safetensors"


def check_safetensors(path: Path) -> None:
    """The JSON header parses and its tensors cover the rest of the file exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise _corrupt(path, f"its header claims {n} bytes but the file holds {size}; truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise _corrupt(path, "its header lacks tensor data_offsets") from None
    if 8 + n + end != size:
        raise _corrupt(path, f"its tensors need {8 + n + end} bytes but the file holds {size}; truncated")


def _skip_gguf_value(cur: _Cursor, value_type: int) -> int | None:
    """Skip one metadata value; return it when it is an unsigned 32-bit int (for alignment)."""
    if value_type in _GGUF_SCALAR:
        if value_type == 4:
            return cur.unpack("<I")[0]
        cur.skip(_GGUF_SCALAR[value_type])
    elif value_type == _GGUF_STRING:
        cur.string()
    elif value_type == _GGUF_ARRAY:
        (elem_type, count) = cur.unpack("<IQ")
        if elem_type in _GGUF_SCALAR:
            cur.skip(count * _GGUF_SCALAR[elem_type])
        elif elem_type in (_GGUF_STRING, _GGUF_ARRAY):
            for _ in range(count):
                _skip_gguf_value(cur, elem_type)
        else:
            raise ValueError(f"unknown metadata array type {elem_type}")
    else:
        raise ValueError(f"unknown metadata value type {value_type}")
    return None


def _gguf_extent(cur: _Cursor) -> int:
    """Bytes the file needs: metadata, tensor table and every tensor's data."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if bytes(cur.buf[:4]) != GGUF_MAGIC:
        raise ValueError("it does not start with the GGUF magic bytes")
    cur.skip(4)
    (version, n_tensors, n_kv) = cur.unpack("<IQQ")
    if version not in GGUF_VERSIONS:
        raise ValueError(f"GGUF version {version}, expected {' or '.join(map(str, GGUF_VERSIONS))}")
    alignment = 32
    for _ in range(n_kv):
        key = cur.string()
        (value_type,) = cur.unpack("<I")
        value = _skip_gguf_value(cur, value_type)
        if key == b"general.alignment" and value:
            alignment = value
    tensors = []
    for _ in range(n_tensors):
        cur.string()
        (n_dims,) = cur.unpack("<I")
        if n_dims > _GGUF_MAX_DIMS:
            raise ValueError(f"a tensor with {n_dims} dimensions")
        dims = cur.unpack(f"<{n_dims}Q")
        (ggml_type, offset) = cur.unpack("<IQ")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ValueError(f"unknown tensor type {ggml_type}") from None
        n = 1
        for d in dims:
            n *= d
        tensors.append(offset + n // block * type_size)
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    return data_start + max(tensors, default=0)


def check_gguf(path: Path) -> None:
    """Header, metadata and tensor table parse, and every tensor's data lies inside the file."""
    size = path.stat().st_size
    if size == 0:
        raise _corrupt(path, "it is empty")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            need = _gguf_extent(_Cursor(buf))
        except _Truncated:
            raise _corrupt(path, "it ends inside its header; truncated") from None
        except ValueError as err:
            raise _corrupt(path, str(err)) from None
    if need > size:
        raise _corrupt(path, f"its tensors need {need} bytes but the file holds {size}; truncated")


def check_weight_files(files: list[Path]) -> None:
    """Check every safetensors and GGUF file in `files` (pickle files are left to the loader)."""
    for path in files:
        try:
            if path.suffix == ".safetensors":
                check_safetensors(path)
            elif path.suffix == ".gguf":
                check_gguf(path)
        except OSError as err:
            raise ModelError(f"model.name: {path} cannot be read ({err.strerror or err})") from None
