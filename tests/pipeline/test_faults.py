"""Faults during a run end in one clear line, leave no output that looks complete, and leave
the outputs of an earlier run byte-identical; the next run recovers.

- NaN or Inf in the loss or in a gradient stops the run, naming the micro-batch or parameter;
- out of device memory suggests smaller micro-batches;
- Ctrl-C (KeyboardInterrupt, and a real SIGINT) ends in `Error: interrupted; ...`;
- a full disk ends in one line;
- SIGKILL in the middle of writing the shards, under a real `dvc repro`, and the next
  `dvc repro` completes with outputs byte-identical to an uninterrupted run;
- missing, truncated or foreign shards make `rank` name the file;
- random params.yaml content never gets past validation as anything but a clean error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _cli import ROOT, assert_error, earlier_run, invoke, snapshot, write_params_file
from _tiny import copy_project
from critical_weights.artifacts import shards
from critical_weights.config.params import Params, load_params, parse_params
from critical_weights.core.errors import NumericalError, ParamsError
from critical_weights.ranking.stage import run_rank
from critical_weights.sensitivity import accumulate as sens_lib

FORMAT = shards.FORMAT
VENV_ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    """An earlier, successful run: params.yaml, prepared/, sensitivity/ and ranked/."""
    folder = tmp_path_factory.mktemp("earlier-run")
    params = earlier_run(folder, tiny_model_dir)
    run_rank(folder / "sensitivity", params.rank, folder / "ranked")
    return folder


@pytest.fixture
def untouched(run):
    """Asserts, after the test, that the earlier run's outputs are byte-identical and that no
    temporary sibling was left behind."""
    before = snapshot(run)
    yield
    assert snapshot(run) == before, "a failed stage changed or left something in the earlier run"


def _params(run: Path, tmp_path: Path, **sections: dict) -> Path:
    raw = yaml.safe_load((run / "params.yaml").read_text(encoding="utf-8"))
    for section, fields in sections.items():
        raw[section].update(fields)
    return write_params_file(tmp_path / "params.yaml", raw)


def _sensitivity(run: Path, params: Path):
    return invoke("sensitivity", "--params", params, "--prepared", run / "prepared", "--out", run / "sensitivity")


# ----------------------------------------------------------------------------- NaN and Inf


def test_nan_loss_stops_the_run_naming_the_micro_batch(tiny_model, tiny_ids):
    with torch.no_grad():
        tiny_model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    params = sens_lib.scored_parameters(tiny_model, "weights")
    with pytest.raises(NumericalError) as info:
        sens_lib.accumulate(tiny_model, tiny_ids, params, ["grad_x_weight"], micro_batch_size=2)
    assert str(info.value) == "the loss of micro-batch 0 is nan; try model.dtype float32"


def test_infinite_gradient_stops_the_run_naming_the_parameter(tiny_model, tiny_ids):
    weight = tiny_model.model.layers[1].mlp.down_proj.weight
    handle = weight.register_hook(lambda g: g * float("inf"))  # the loss stays finite, its gradient does not
    params = sens_lib.scored_parameters(tiny_model, "weights")
    try:
        with pytest.raises(NumericalError) as info:
            sens_lib.accumulate(tiny_model, tiny_ids, params, ["grad_x_weight"], micro_batch_size=2)
    finally:
        handle.remove()
    assert str(info.value) == ("parameter model.layers.1.mlp.down_proj.weight: its gradient holds NaN or Inf; "
                               "try model.dtype float32")


def test_nan_during_the_stage_leaves_the_earlier_shards(run, tmp_path, untouched, monkeypatch):
    real = sens_lib.final_hidden
    monkeypatch.setattr(sens_lib, "final_hidden", lambda *a: real(*a) * float("nan"))
    assert_error(_sensitivity(run, run / "params.yaml"), "the loss of micro-batch 0 is nan; try model.dtype float32")


# ----------------------------------------------------------------------------- out of memory, Ctrl-C, full disk


def _raise(exc: BaseException, real=None, after: int = 0):
    """A stand-in that raises `exc`, after letting `after` calls through to `real`."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        if len(calls) <= after:
            return real(*args, **kwargs)
        raise exc
    return fail


def test_out_of_memory_suggests_smaller_micro_batches(run, tmp_path, untouched, monkeypatch):
    monkeypatch.setattr(sens_lib, "final_hidden", _raise(torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB")))
    params = _params(run, tmp_path, sensitivity={"micro_batch_size": 4, "batch_tokens": 0, "checkpointing": False})
    assert_error(_sensitivity(run, params), (
        "out of device memory in forward+backward (sensitivity.micro_batch_size 4, sensitivity.batch_tokens 0, "
        "sensitivity.checkpointing false); set sensitivity.checkpointing true, lower sensitivity.micro_batch_size "
        "(try 2) or set sensitivity.batch_tokens (try 48)"))


def test_out_of_memory_with_one_sequence_per_micro_batch(run, tmp_path, untouched, monkeypatch):
    monkeypatch.setattr(sens_lib, "final_hidden", _raise(torch.OutOfMemoryError("CUDA out of memory.")))
    params = _params(run, tmp_path, sensitivity={"micro_batch_size": 1})
    assert_error(_sensitivity(run, params), (
        "out of device memory in forward+backward even for one sequence of 24 tokens "
        "(sensitivity.micro_batch_size 1, sensitivity.batch_tokens 256); lower texts.max_length, use model.dtype "
        "bfloat16, or spread the model with model.device_map auto"))


@pytest.mark.parametrize("where", ["forward", "write"])
def test_keyboard_interrupt_is_one_line_and_leaves_no_half_output(run, untouched, monkeypatch, where):
    if where == "forward":
        monkeypatch.setattr(sens_lib, "final_hidden", _raise(KeyboardInterrupt()))
    else:  # after some shards of the new output are already written
        monkeypatch.setattr(shards.CandidateWriter, "add", _raise(KeyboardInterrupt(), shards.CandidateWriter.add, after=3))
    assert_error(_sensitivity(run, run / "params.yaml"), "interrupted; no output was left half-written")


def test_full_disk_is_one_line(run, untouched, monkeypatch):
    full = run / "sensitivity" / "candidates.parquet"
    monkeypatch.setattr(shards.CandidateWriter, "add", _raise(OSError(errno.ENOSPC, "No space left on device", str(full))))
    assert_error(_sensitivity(run, run / "params.yaml"),
                 f"{full}: No space left on device; free some space and rerun (no output was left half-written)")


def test_other_os_errors_keep_their_traceback(run, untouched, monkeypatch):
    """An OSError the machine does not explain (here ENOENT) may be a bug: it is not hidden."""
    monkeypatch.setattr(shards.CandidateWriter, "add", _raise(FileNotFoundError(errno.ENOENT, "No such file", "x")))
    result = _sensitivity(run, run / "params.yaml")
    assert isinstance(result.exception, FileNotFoundError)


# ----------------------------------------------------------------------------- real signals


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # runs in the child, before it execs


@contextlib.contextmanager
def _started(args: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """Start `args` in a session of its own with SIGINT at its default disposition, and end it
    and everything it started when the test ends, passed or failed.

    A shell that runs pytest as a background job ignores SIGINT, and children inherit an
    ignored signal, so the test sets the disposition itself rather than depend on its caller's."""
    process = subprocess.Popen(args, start_new_session=True, preexec_fn=_default_sigint, **kwargs)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the process and its children (dvc runs the stage in one)
        process.wait(timeout=60)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0, poll: float = 0.002):
    """Poll `predicate` until it returns something truthy; fail if the process ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = predicate()
        if found:
            return found
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the process ended (rc {process.returncode}) before the moment to signal it:\n{out}\n{err}")
        time.sleep(poll)
    process.kill()
    pytest.fail("timed out waiting for the moment to signal the process")


def _writing(folder: Path, name: str):
    """The pid of a process half-way through writing `folder/name`, from its temporary sibling."""
    for tmp in folder.glob(f".{name}.*.tmp"):
        if (tmp / name / "candidates.parquet").is_file():  # scoring has begun
            return int(tmp.name.split(".")[2])
    return None


def test_sigint_to_a_running_stage(run, tmp_path, untouched):
    """A real Ctrl-C (SIGINT) during forward+backward: one line, exit 1, earlier output intact."""
    slow = _params(run, tmp_path, sensitivity={"metrics": ["grad_x_weight", "hutchinson"], "hutchinson_probes": 500,
                                               "micro_batch_size": 1})
    log = tmp_path / "stderr.txt"
    args = [sys.executable, str(ROOT / "stages" / "sensitivity.py"), "--params", str(slow),
            "--prepared", str(run / "prepared"), "--out", str(run / "sensitivity")]
    with open(log, "w") as stderr, _started(args, stdout=subprocess.DEVNULL, stderr=stderr, env=VENV_ENV) as process:
        _wait_for(lambda: "load model took" in log.read_text(), process)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    err = log.read_text()
    assert process.returncode == 1, err
    assert "Traceback" not in err
    assert err.rstrip("\n").splitlines()[-1] == "Error: interrupted; no output was left half-written"


@pytest.fixture
def project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A git repo holding a copy of the project, set to the tiny model and a few texts."""
    repo = copy_project(tmp_path / "project")
    raw = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    raw["model"].update(name=str(tiny_model_dir), device="cpu", dtype="float32")
    raw["texts"].update(n_texts=8, max_length=24)
    raw["sensitivity"].update(keep=20, metrics=["grad_x_weight", "magnitude"])
    raw["rank"].update(k=5)
    if "validate" in raw:
        raw["validate"]["k_values"] = [1, 5]
    raw["domains"].update(top_n=10, per_tensor_k=5)
    write_params_file(repo / "params.yaml", raw)
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny project"]):
        subprocess.run(args, cwd=repo, check=True, capture_output=True, env=VENV_ENV)
    return repo


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, timeout=600, env=VENV_ENV)


def test_sigkill_mid_write_under_dvc_repro_then_dvc_repro_recovers(project, tmp_path):
    data = project / "data"
    with _started(["dvc", "repro", "sensitivity"], cwd=project, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True, env=VENV_ENV) as process:
        pid = _wait_for(lambda: _writing(data, "sensitivity"), process)
        os.kill(pid, signal.SIGKILL)  # the stage's own process, half-way through writing its shards
        out, err = process.communicate(timeout=120)
    assert process.returncode != 0, out + err
    assert "failed to reproduce 'sensitivity'" in err

    # nothing that looks complete: no data/sensitivity, only the killed process's temporary sibling
    assert not (data / "sensitivity").exists()
    (leftover,) = data.glob(".sensitivity.*.tmp")
    assert str(pid) in leftover.name
    lock = yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))
    assert "prepare" in lock["stages"] and "sensitivity" not in lock["stages"]

    again = _dvc(project, "repro", "sensitivity")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Running stage 'sensitivity'" in again.stdout and "Running stage 'prepare'" not in again.stdout
    assert not list(data.glob(".sensitivity.*.tmp")), "the killed run's temporary folder was not removed"

    # byte-identical to an uninterrupted run of the same stage
    reference = tmp_path / "reference"
    params = load_params(project / "params.yaml")
    from critical_weights.sensitivity.stage import run_sensitivity
    from critical_weights.core.progress import Timings

    run_sensitivity(data / "prepared", params, reference, Timings("sensitivity"))
    assert snapshot(data / "sensitivity") == snapshot(reference)
    status = _dvc(project, "status", "sensitivity")
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout


def test_stale_temporary_folders_of_dead_processes_are_removed(run, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = run / f".ranked.{int(dead.stdout)}.abcd1234.tmp"
    (stale / "ranked").mkdir(parents=True)
    (stale / "ranked" / "critical.parquet").write_bytes(b"half")
    mine = run / f".ranked.{os.getpid()}.efgh5678.tmp"  # a live process's: kept
    mine.mkdir()
    try:
        result = invoke("rank", "--params", run / "params.yaml", "--sensitivity", run / "sensitivity",
                        "--out", run / "ranked")
        assert result.exit_code == 0, result.output
        assert not stale.exists() and mine.exists()
    finally:
        shutil.rmtree(mine, ignore_errors=True)


# ----------------------------------------------------------------------------- damaged shards


def _first(folder: Path, kind: str = "candidates") -> Path:
    return folder / f"{kind}.parquet"


def _missing(path: Path) -> None:
    path.unlink()


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _foreign(path: Path) -> None:
    pq.write_table(pa.table({"name": ["x"], "value": [1.0]}), path)


SHARD_CASES = {
    "missing candidates": (lambda s: _first(s), _missing,
                           "shard {path} is missing; rerun the sensitivity stage (dvc repro)"),
    "truncated candidates": (lambda s: _first(s), _truncated,
                             "shard {path} is corrupt or truncated ("
                             "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a "
                             "parquet file.); rerun the sensitivity stage (dvc repro)"),
    "empty candidates": (lambda s: _first(s), _empty,
                         "shard {path} is corrupt or truncated ("
                         "Parquet file size is 0 bytes); rerun the sensitivity stage (dvc repro)"),
    "foreign candidates": (lambda s: _first(s), _foreign,
                           "shard {path} has a foreign schema (columns name, value), not " + FORMAT +
                           "; rerun the sensitivity stage (dvc repro)"),
    "truncated stats": (lambda s: s / "stats.parquet", _truncated,
                        "shard {path} is corrupt or truncated ("
                        "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a "
                        "parquet file.); rerun the sensitivity stage (dvc repro)"),
    "missing meta": (lambda s: s / "meta.json", _missing,
                     "shard {path} is missing; rerun the sensitivity stage (dvc repro)"),
    "truncated meta": (lambda s: s / "meta.json", _truncated,
                       "shard {path} is corrupt ({json_error}); rerun the sensitivity stage (dvc repro)"),
    "foreign meta": (lambda s: s / "meta.json", lambda p: p.write_text('{"format": "something/else"}'),
                     "shard {path} is not a " + FORMAT + " file; rerun the sensitivity stage (dvc repro)"),
    "meta lacking keys": (lambda s: s / "meta.json", lambda p: p.write_text(json.dumps({"format": FORMAT, "keep": 3})),
                          "shard {path} lacks metrics, params, hist_log10_edges; rerun the sensitivity stage (dvc repro)"),
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_rank_names_a_damaged_shard(run, tmp_path, untouched, case):
    damaged = tmp_path / "sensitivity"
    shutil.copytree(run / "sensitivity", damaged)
    locate, damage, message = SHARD_CASES[case]
    path = locate(damaged)
    json_error = ""
    if case == "truncated meta":
        text = path.read_text(encoding="utf-8")
        try:
            json.loads(text[: len(text.encode()) // 2])
        except json.JSONDecodeError as err:
            json_error = str(err)
    damage(path)
    result = invoke("rank", "--params", run / "params.yaml", "--sensitivity", damaged, "--out", run / "ranked")
    assert_error(result, message.format(path=path, json_error=json_error))


# ----------------------------------------------------------------------------- random params.yaml


KNOWN_KEYS = [
    "seed", "texts", "model", "sensitivity", "rank", "plot", "validate", "source", "n_texts", "max_length", "name",
    "dtype", "device", "device_map", "trust_remote_code", "allow_pickle", "metrics", "parameters",
    "micro_batch_size", "batch_tokens", "keep", "dense", "hutchinson_probes", "metric", "mode", "k", "include",
    "exclude", "dpi", "heatmap_stat", "perturbations", "controls", "k_values", "noise_sigma", "bit", "holdout",
    "random_draws", "exported", "single_weights", "heatmap_tensor",
]
near_keys = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(KNOWN_KEYS).flatmap(lambda k: st.sampled_from([k[:-1], k + "s", k.upper(), k[1:], k + "_", k[::-1]])),
    st.text(max_size=12),
    st.integers(-3, 3), st.booleans(), st.none(),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=30),
    st.sampled_from(["grad_x_weight", "fisher", "magnitude", "cuda", "cpu", "float16", "auto", "global", "weights",
                     "", " ", "1e3", "yes", "NaN"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(near_keys, inner, max_size=6)), max_leaves=25)


section_names = st.sampled_from(["seed", "texts", "model", "sensitivity", "rank", "plot", "validate"])
raw_params = st.one_of(values, st.dictionaries(  # mostly-real params: sections mapping near-real keys to values
    st.one_of(section_names, near_keys), st.one_of(st.dictionaries(near_keys, values, max_size=6), values), max_size=8))


def _clean(err: ParamsError) -> None:
    assert err.problems
    for problem in err.problems:
        assert isinstance(problem, str) and problem and "\n" not in problem and len(problem) < 2000, problem


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw_params)
def test_random_params_give_params_or_a_clean_params_error(raw):
    try:
        assert isinstance(parse_params(raw), Params)
    except ParamsError as err:
        _clean(err)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw_params, st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(
    [":", "-", "[", "]", "{", "}", "\t", "\n", " ", "&a", "*a", "!!python/object:os.system", "'", '"', "#", "\x00",
     "\xff", "? ", "%YAML 1.1\n", "---\n", "..."])), max_size=4))
def test_random_params_files_give_params_or_a_clean_params_error(tmp_path_factory, raw, edits):
    text = yaml.safe_dump(raw, allow_unicode=True, sort_keys=False)
    for position, insert in edits:  # mutate valid YAML into nearly-valid YAML
        position %= len(text) + 1
        text = text[:position] + insert + text[position:]
    path = tmp_path_factory.getbasetemp() / "random-params.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    try:
        assert isinstance(load_params(path), Params)
    except ParamsError as err:
        _clean(err)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw_params)
def test_random_params_through_a_stage_cli(tmp_path_factory, raw):
    """The rank stage (no torch, so fast) with random params and no shards: always one `Error:` line."""
    base = tmp_path_factory.getbasetemp()
    path = base / "random-cli-params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    (base / "no-shards").mkdir(exist_ok=True)
    result = invoke("rank", "--params", path, "--sensitivity", base / "no-shards", "--out", base / "no-ranked")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error: ")]
    assert line.startswith("Error: invalid params.yaml: ") or line == (
        f"Error: shard {base / 'no-shards' / 'meta.json'} is missing; rerun the sensitivity stage (dvc repro)")
    assert not (base / "no-ranked").exists()
