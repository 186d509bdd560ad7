"""critical_weights.model.weight_files: a complete weight file passes, and any cut, padding or foreign
header is named in one line before a loader ever sees it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from _gguf import write_tiny_gguf
from critical_weights.core.errors import ModelError
from critical_weights.model.weight_files import check_gguf, check_safetensors, check_weight_files


NO_OFFSETS = json.dumps({"a": {"dtype": "F32"}}).encode()


@pytest.fixture
def safetensors_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float16)}, str(path))
    return path


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def message(check, path: Path) -> str:
    with pytest.raises(ModelError) as info:
        check(path)
    return str(info.value)


def test_complete_files_pass(safetensors_file, gguf_bytes, tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(gguf_bytes)
    check_safetensors(safetensors_file)
    check_gguf(gguf)
    check_weight_files([safetensors_file, gguf, tmp_path / "pytorch_model.bin"])  # pickle is the loader's business


def test_safetensors_cut_or_padded_by_one_byte(safetensors_file):
    data = safetensors_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    need = len(data)
    safetensors_file.write_bytes(data[:-1])
    assert message(check_safetensors, safetensors_file) == (
        f"model.name: {safetensors_file} is not a valid safetensors file (its tensors need {need} bytes but the "
        f"file holds {need - 1}; truncated); replace it with a complete copy")
    safetensors_file.write_bytes(data + b"\0")
    assert f"its tensors need {need} bytes but the file holds {need + 1}" in message(check_safetensors, safetensors_file)
    assert n < need  # the header length itself was sane in both cases


@pytest.mark.parametrize("content, why", [
    (b"\x01\x02", "2 bytes, shorter than its 8-byte header length"),
    (struct.pack("<Q", 1000) + b"{}", "its header claims 1000 bytes but the file holds 10; truncated or not safetensors"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "its header is not JSON"),
    (struct.pack("<Q", 2) + b"[]", "its header is not a JSON object"),
    (struct.pack("<Q", len(NO_OFFSETS)) + NO_OFFSETS, "its header lacks tensor data_offsets"),
])
def test_safetensors_headers_that_are_not_safetensors(tmp_path, content, why):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    assert message(check_safetensors, path) == (
        f"model.name: {path} is not a valid safetensors file ({why}); replace it with a complete copy")


def test_gguf_cut_inside_the_data_or_the_header(gguf_bytes, tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(gguf_bytes[:-1])
    assert message(check_gguf, path) == (
        f"model.name: {path} is not a valid GGUF file (its tensors need {len(gguf_bytes)} bytes but the file "
        f"holds {len(gguf_bytes) - 1}; truncated); replace it with a complete copy")
    path.write_bytes(gguf_bytes[:100])
    assert "(it ends inside its header; truncated)" in message(check_gguf, path)


@pytest.mark.parametrize("edit, why", [
    (lambda b: b"", "it is empty"),
    (lambda b: b"GGUX" + b[4:], "it does not start with the GGUF magic bytes"),
    (lambda b: b[:4] + struct.pack("<I", 9) + b[8:], "GGUF version 9, expected 2 or 3"),
])
def test_gguf_that_is_not_gguf(gguf_bytes, tmp_path, edit, why):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(edit(gguf_bytes))
    assert message(check_gguf, path) == f"model.name: {path} is not a valid GGUF file ({why}); replace it with a complete copy"


def test_an_unreadable_file_is_one_line(tmp_path):
    folder = tmp_path / "model.safetensors"
    folder.mkdir()  # a folder where a file should be: reading it fails with an OSError
    with pytest.raises(ModelError, match=r"^model.name: .*model.safetensors cannot be read"):
        check_weight_files([folder])
