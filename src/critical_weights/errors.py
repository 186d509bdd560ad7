"""The library's own exceptions, and their conversion into one-line CLI errors."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn library errors into `Error: ...` with exit status 1; real bugs keep tracebacks."""
    try:
        yield
    except ParamsError as err:
        raise click.ClickException("invalid params.yaml: " + "; ".join(err.problems)) from None
    except CriticalWeightsError as err:
        raise click.ClickException(str(err)) from None
