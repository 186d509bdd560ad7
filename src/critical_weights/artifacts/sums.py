"""The sensitivity stage's float32 sums, kept whole: `data/sensitivity/sums/<kind>.safetensors`.

One file per accumulator the run computed, each keyed by the model's own parameter names
(`model.layers.0.mlp.down_proj.weight`), each tensor float32 in the parameter's stored shape:
- `grad`: dL/dW, the gradient of the mean token loss over every prepared text (always);
- `fisher`: the mean over sequences n of g_n² (with `fisher` or `taylor2`; SqueezeLLM's
  convention of a per-weight Fisher, keyed as the model names its weights);
- `hutchinson`: the Hutchinson estimate of H_ii (with `hutchinson`);
- `act_sq`: each input column's sum over real tokens of x² (with `wanda`), shaped as
  `metrics` documents: (in,) for nn.Linear, (rows, 1) for Conv1D, (E, 1, in) for experts.

From them and the weights, every metric's full score tensor is rebuilt exactly
(`critical_weights.metrics`), so nothing downstream (compression) ever runs forward and
backward again. Each costs 4 bytes per scored weight on disk (act_sq 4 bytes per input
column); `sensitivity.save_sums: false` leaves them out.

The files are plain safetensors (a little-endian u64 header length, a JSON header, the raw
bytes), written here without the safetensors package: the header is fixed first from the
names and shapes, so each tensor lands at its own offset as soon as it is scored, from any
thread, and memory never holds more than the tensors being scored. They read back with
`safetensors.safe_open` or `safetensors.torch.load_file`; `Sums` reads them here with plain
file reads, one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from critical_weights.core.errors import ShardError, first_line

FOLDER = "sums"
KINDS = ("grad", "fisher", "hutchinson", "act_sq")  # the accumulators of critical_weights.sensitivity.accumulate


def path_of(sensitivity: Path, kind: str) -> Path:
    return sensitivity / FOLDER / f"{kind}.safetensors"


_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "U8": "u1"}  # safetensors dtype -> numpy (BF16: its bits)


class SumsWriter:
    """One safetensors file whose tensors arrive one at a time, in any order; the same tensors
    give the same bytes (the header's keys, metadata included, in the order given)."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], dtype: str = "F32"):
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self.dtype = _DTYPES[dtype]
        for name, shape in shapes.items():
            size = np.dtype(self.dtype).itemsize * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.start = 8 + len(raw)
        self.header, self.missing = header, set(shapes)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(self.fd, self.start + offset)

    def write(self, name: str, values: np.ndarray) -> None:
        """`values`: the tensor's values (float32 for sums; for BF16 the uint16 bit patterns), any
        layout that reshapes to its shape."""
        entry = self.header[name]
        data = np.ascontiguousarray(values, dtype=self.dtype).reshape(-1)
        if data.size != math.prod(entry["shape"]):
            raise ValueError(f"sums file: {name} has {data.size} values, its header says {entry['shape']}")
        view, at = memoryview(data).cast("B"), self.start + entry["data_offsets"][0]  # no copy of the values
        while view:  # pwrite may write less than asked
            done = os.pwrite(self.fd, view, at)
            view, at = view[done:], at + done
        self.missing.discard(name)

    def close(self) -> None:
        os.close(self.fd)
        if self.missing:
            raise RuntimeError(f"sums file: {len(self.missing)} tensors never written, e.g. {sorted(self.missing)[0]}")


class Sums:
    """The saved sums of one sensitivity run, read one tensor at a time with plain file reads
    (no memory map, so the pages read never stay in the process's memory)."""

    def __init__(self, sensitivity: Path):
        folder = sensitivity / FOLDER
        if not folder.is_dir():
            raise ShardError(f"{folder}: no saved sums; set sensitivity.save_sums true and rerun the sensitivity stage "
                             "(dvc repro)")
        self.files: dict[str, tuple[Path, int, dict[str, Any]]] = {}  # kind -> (path, data start, header)
        for kind in KINDS:
            path = path_of(sensitivity, kind)
            if path.is_file():
                self.files[kind] = _header(path)
        if "grad" not in self.files:
            raise ShardError(f"{path_of(sensitivity, 'grad')}: missing; rerun the sensitivity stage (dvc repro)")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.files)

    def has(self, kind: str, name: str) -> bool:
        return kind in self.files and name in self.files[kind][2]

    def get(self, kind: str, name: str) -> np.ndarray:
        """The float32 sum `kind` of parameter `name`, in its stored shape."""
        if not self.has(kind, name):
            raise ShardError(f"parameter {name}: no {kind} sum in the saved sums; rerun the sensitivity stage (dvc repro)")
        path, start, header = self.files[kind]
        entry = header[name]
        begin, end = entry["data_offsets"]
        values = np.fromfile(path, dtype="<f4", count=(end - begin) // 4, offset=start + begin)
        return values.reshape(entry["shape"])

    def metadata(self) -> dict[str, str]:
        return self.files["grad"][2].get("__metadata__") or {}


def _header(path: Path) -> tuple[Path, int, dict[str, Any]]:
    """(path, where the data start, the JSON header) of a float32 safetensors file, checked."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= path.stat().st_size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {path.stat().st_size}")
            header = json.loads(f.read(n))
        size = path.stat().st_size - 8 - n
        for name, entry in header.items():
            if name != "__metadata__" and (entry["dtype"] != "F32" or not 0 <= entry["data_offsets"][0]
                                           <= entry["data_offsets"][1] <= size):
                raise ValueError(f"tensor {name} is {entry['dtype']} at {entry['data_offsets']} of {size} bytes")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not a readable safetensors file of float32 sums ({first_line(e)}); "
                         "rerun the sensitivity stage (dvc repro)") from None
    return path, 8 + n, header
