"""Helpers for the error and fault tests: run a stage script's Click command in-process, check
its one-line `Error: ...`, and fingerprint output folders to prove they were left untouched."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from click.testing import CliRunner, Result

ROOT = Path(__file__).resolve().parents[1]


@cache
def stage(name: str) -> ModuleType:
    """stages/<name>.py, imported by path (stages/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_errors_stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def invoke(name: str, *args: object) -> Result:
    return CliRunner().invoke(stage(name).main, [str(a) for a in args])


def assert_error(result: Result, message: str) -> None:
    """Exit status 1, no traceback, and the last line of output is exactly `Error: message`."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    last = result.output.rstrip("\n").splitlines()[-1]
    assert last == f"Error: {message}", f"\n got: {last}\nwant: Error: {message}"


def write_params_file(path: Path, params: Any) -> Path:
    """A params.yaml holding `params` (a Params object or a plain dict)."""
    raw = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else params
    path.write_text(yaml.safe_dump(_plain(raw), sort_keys=False), encoding="utf-8")
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (and the names of every folder), by relative path."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def earlier_run(folder: Path, model_dir: Path) -> Any:
    """An earlier, successful run of the tiny model in `folder`: params.yaml, prepared/ and
    sensitivity/. Returns its Params, so a caller can run more stages on it."""
    from conftest import run_prepare_and_sensitivity, tiny_params

    params = tiny_params(model_dir, sensitivity={"keep": 20, "dense": False}, rank={"k": 5},
                         validate={"k_values": (1, 5)})
    run_prepare_and_sensitivity(folder, params)
    write_params_file(folder / "params.yaml", params)
    return params
