"""critical_weights.cli: the Click plumbing every stage script shares."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from _cli import assert_error, stage, write_params_file
from _tiny import tiny_params
from critical_weights.cli import INPUT_DIR, PATH, stage_command
from critical_weights.config.params import Params
from critical_weights.core.errors import ShardError

STAGE_SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "stages").glob("*.py"))


def toy(seen: dict, fail: Exception | None = None) -> click.Command:
    """A stage that records what it was given, and raises `fail` if set."""

    @stage_command("toy", "Toy stage.\n\nExample:\n\n    python stages/toy.py --data d --out o")
    @click.option("--data", type=INPUT_DIR, required=True, help="An input folder.")
    @click.option("--out", type=PATH, required=True, help="An output folder.")
    def main(params: Params, timings, data: Path, out: Path) -> None:
        seen.update(params=params, data=data, out=out)
        with timings.phase("work"):
            if fail is not None:
                raise fail

    return main


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    return write_params_file(tmp_path / "params.yaml", tiny_params(tmp_path / "model"))


def test_body_gets_validated_params_and_typed_paths(tmp_path, params_file):
    seen: dict = {}
    timings = tmp_path / "logs" / "toy.json"
    result = CliRunner().invoke(toy(seen), ["--params", params_file, "--data", tmp_path, "--out", "o",
                                            "--timings", timings])
    assert result.exit_code == 0, result.output
    assert isinstance(seen["params"], Params) and seen["params"].seed == 42
    assert seen["data"] == tmp_path and seen["out"] == Path("o")
    record = json.loads(timings.read_text(encoding="utf-8"))
    assert record["stage"] == "toy" and list(record["phases_s"]) == ["work"]


def test_help_lists_params_first_own_options_then_timings():
    result = CliRunner().invoke(toy({}), ["--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "[default: params.yaml]" in result.output
    text = result.output.split("Options:")[1]
    order = [text.index(flag) for flag in ("--params", "--data", "--out", "--timings")]
    assert order == sorted(order), text


def test_library_error_is_one_line_and_no_timings_file(tmp_path, params_file):
    timings = tmp_path / "toy.json"
    args = ["--params", params_file, "--data", tmp_path, "--out", "o", "--timings", timings]
    result = CliRunner().invoke(toy({}, ShardError("shard x is missing; rerun the sensitivity stage")), args)
    assert_error(result, "shard x is missing; rerun the sensitivity stage")
    assert not timings.exists()


def test_bad_params_stop_before_the_body(tmp_path):
    seen: dict = {}
    bad = write_params_file(tmp_path / "params.yaml", {"seed": -1})
    result = CliRunner().invoke(toy(seen), ["--params", bad, "--data", tmp_path, "--out", "o"])
    assert result.exit_code == 1 and result.output.startswith("Error: invalid params.yaml: ")
    assert seen == {}


def test_a_bug_keeps_its_traceback(tmp_path, params_file):
    result = CliRunner().invoke(toy({}, ValueError("a bug")), ["--params", params_file, "--data", tmp_path, "--out", "o"])
    assert isinstance(result.exception, ValueError)


@pytest.mark.parametrize("name", STAGE_SCRIPTS)
def test_every_stage_script_uses_the_shared_command(name):
    command = stage(name).main
    assert command.name == name
    flags = [p.opts[0] for p in command.params]
    assert flags[0] == "--params" and flags[-1] == "--timings", flags
