"""The library's own exceptions, and their conversion into one-line CLI errors."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

import click


class CriticalWeightsError(Exception):
    """Base class: a problem the user can fix (bad params, input, model or shard)."""


class ParamsError(CriticalWeightsError):
    """params.yaml is invalid. Holds every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class TextsError(CriticalWeightsError):
    """The text source is missing, unreadable or empty."""


class ModelError(CriticalWeightsError):
    """The model cannot be found, loaded or used."""


class ShardError(CriticalWeightsError):
    """A sensitivity shard or ranked file is missing, corrupt or foreign."""


class NumericalError(CriticalWeightsError):
    """A loss or gradient is NaN or infinite."""


class ResourceError(CriticalWeightsError):
    """The machine ran out of something (device memory, say) that smaller settings would need less of."""


class RanksError(CriticalWeightsError):
    """A process of a run sharded over many failed; its own error is in the log above."""


class ReportError(CriticalWeightsError):
    """A report given on the command line (such as critical_weights.csv) is missing or malformed."""


def out_of_memory(micro_batch_size: int, batch_tokens: int, longest: int, checkpointing: bool = True) -> ResourceError:
    """What to say when forward+backward runs out of device memory, with settings to try."""
    now = f"sensitivity.micro_batch_size {micro_batch_size}, sensitivity.batch_tokens {batch_tokens}"
    if not checkpointing:
        now += ", sensitivity.checkpointing false"
    recompute = "" if checkpointing else "set sensitivity.checkpointing true, "
    alone = micro_batch_size == 1 or (batch_tokens and batch_tokens < 2 * longest)  # the longest text has a batch of its own
    if not alone:
        half = max(1, micro_batch_size // 2)
        budget = max(longest, (batch_tokens or micro_batch_size * longest) // 2)
        return ResourceError(
            f"out of device memory in forward+backward ({now}); {recompute}lower sensitivity.micro_batch_size "
            f"(try {half}) or set sensitivity.batch_tokens (try {budget})"
        )
    return ResourceError(
        f"out of device memory in forward+backward even for one sequence of {longest} tokens ({now}); "
        f"{recompute}lower texts.max_length, use model.dtype bfloat16, or spread the model with model.device_map auto"
    )


# OSErrors that the machine, not the code, causes: reported in one line, not as a traceback
_MACHINE_ERRNOS = {
    errno.ENOSPC: "free some space and rerun",
    errno.EDQUOT: "free some space and rerun",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
}


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn library errors into `Error: ...` with exit status 1; real bugs keep tracebacks.

    Ctrl-C and a full or read-only disk also end in one line: the outputs are written
    atomically (see outputs.atomic_path), so none is left half-written."""
    try:
        yield
    except ParamsError as err:
        raise click.ClickException("invalid params.yaml: " + "; ".join(err.problems)) from None
    except CriticalWeightsError as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; no output was left half-written") from None
    except OSError as err:
        if err.errno not in _MACHINE_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        raise click.ClickException(
            f"{where}{err.strerror}; {_MACHINE_ERRNOS[err.errno]} (no output was left half-written)"
        ) from None
