"""The engine behind params.yaml's validation: rules for one value, and one section reader.

A params dataclass states each field's default and rule once, with `param(default, rule)`.
`read_section` walks the fields of such a dataclass (recursing into fields whose default is
itself a dataclass), checks each given value against its rule, and records a problem, instead
of raising, for every value refused and every key it does not know. A refused value stands in
as its default, so reading always finishes and every problem is reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import reprlib
from dataclasses import dataclass
from typing import Any

_REPR = reprlib.Repr()  # bounded: a huge or aliased (billion laughs) value prints short
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 6, 6, 6
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


class Refused(Exception):
    """A value a rule does not accept; the message follows "section.key: "."""


def show(value: Any) -> str:
    """A value as it appears in a message: repr, one line, bounded however large or nested."""
    return _REPR.repr(value)


def did_you_mean(value: Any, allowed: tuple[str, ...]) -> str:
    """" (did you mean X?)" when a string value is close to one allowed name, else ""."""
    close = difflib.get_close_matches(value[:100], allowed, n=1) if isinstance(value, str) else []
    return f" (did you mean {close[0]}?)" if close else ""


def name(key: Any) -> str:
    """A key as it appears in a message: itself when printable and short, else its repr."""
    return key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60 else show(key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- rules
# Each rule's `check` returns the value as the dataclass holds it, or raises Refused.


@dataclass(frozen=True)
class Integer:
    minimum: int | None = None
    maximum: int | None = None

    def check(self, value: Any) -> int:
        if not _is_int(value):
            raise Refused(f"{show(value)} is not an integer")
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            bounds = f">= {self.minimum}" if self.maximum is None else f"between {self.minimum} and {self.maximum}"
            raise Refused(f"{show(value)} must be an integer {bounds}")
        return value


@dataclass(frozen=True)
class Number:
    minimum: float
    maximum: float

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.minimum <= value <= self.maximum:
            raise Refused(f"{show(value)} must be a number between {self.minimum} and {self.maximum}")
        return float(value)


@dataclass(frozen=True)
class Positive:
    """A finite number > 0; `hint` says what is usual."""

    hint: str

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise Refused(f"{show(value)} must be a positive number ({self.hint})")
        return float(value)


@dataclass(frozen=True)
class Boolean:
    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise Refused(f"{show(value)} must be true or false")
        return value


@dataclass(frozen=True)
class String:
    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise Refused(f"{show(value)} must be a non-empty string")
        return value


@dataclass(frozen=True)
class Choice:
    allowed: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...] = ()  # (another accepted name, the allowed name it stands for)

    def check(self, value: Any) -> str:
        if isinstance(value, str):
            value = dict(self.aliases).get(value, value)
        if value not in self.allowed:
            raise Refused(f"{show(value)} is not one of {', '.join(self.allowed)}{did_you_mean(value, self.allowed)}")
        return value


@dataclass(frozen=True)
class Choices:
    """A list of strings; with `allowed`, each must be one of them, at least one, none repeated."""

    allowed: tuple[str, ...] | None = None

    def check(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise Refused(f"{show(value)} must be a list of strings")
        if self.allowed is None:
            return tuple(value)
        bad = [v for v in value if v not in self.allowed]
        if bad:
            hints = "".join(did_you_mean(v, self.allowed) for v in bad)
            raise Refused(f"{', '.join(map(show, bad))} not one of {', '.join(self.allowed)}{hints}")
        if not value:
            raise Refused(f"[] must name at least one of {', '.join(self.allowed)}")
        if len(set(value)) != len(value):
            raise Refused(f"{show(value)} repeats an entry")
        return tuple(value)


@dataclass(frozen=True)
class Integers:
    """A list of integers in [minimum, maximum], held sorted and without repeats; non-empty
    unless `empty` says what an empty list means."""

    minimum: int
    maximum: int | None = None
    empty: str | None = None  # what [] means ("none"), when it is allowed

    def check(self, value: Any) -> tuple[int, ...]:
        top = self.maximum if self.maximum is not None else float("inf")
        filled = bool(value) or self.empty is not None
        if not (isinstance(value, list) and filled and all(_is_int(v) and self.minimum <= v <= top for v in value)):
            bounds = f">= {self.minimum}" if self.maximum is None else f"from {self.minimum} to {self.maximum}"
            what = "a non-empty list" if self.empty is None else f"a list ([] = {self.empty})"
            raise Refused(f"{show(value)} must be {what} of integers {bounds}")
        return tuple(sorted(set(value)))


@dataclass(frozen=True)
class Fractions:
    """A non-empty list of numbers strictly between 0 and 1, held sorted and without repeats."""

    what: str  # what a value is ("sparsity")

    def check(self, value: Any) -> tuple[float, ...]:
        ok = isinstance(value, list) and value and all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < 1 for v in value)
        if not ok:
            raise Refused(f"{show(value)} must be a non-empty list of numbers strictly between 0 and 1 (each a {self.what})")
        return tuple(sorted({float(v) for v in value}))


@dataclass(frozen=True)
class Structures:
    """A non-empty list of pruning structures: `unstructured`, or `N:M` with 0 < N < M <= 64."""

    def check(self, value: Any) -> tuple[str, ...]:
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise Refused(f"{show(value)} must be a non-empty list of structures: unstructured, or N:M such as 2:4")
        for v in value:
            n, colon, m = v.partition(":")
            if v == "unstructured":
                continue
            if not (colon and n.isdigit() and m.isdigit()):
                raise Refused(f"{show(v)} is not a structure; use unstructured, or N:M such as 2:4 or 4:8"
                              f"{did_you_mean(v, ('unstructured', '2:4', '4:8'))}")
            if not 0 < int(n) < int(m) <= 64:
                raise Refused(f"{show(v)}: N:M prunes N of every M inputs and needs 0 < N < M <= 64 (2:4, 4:8)")
        if len(set(value)) != len(value):
            raise Refused(f"{show(value)} repeats an entry")
        return tuple(value)


@dataclass(frozen=True)
class ChoiceOrIndex:
    """One of some names, or an integer index in range(limit)."""

    allowed: tuple[str, ...]
    limit: int
    what: str  # what an index counts, as the message names it ("a bit index")

    def check(self, value: Any) -> str | int:
        if value in self.allowed or (_is_int(value) and 0 <= value < self.limit):
            return value
        raise Refused(f"{show(value)} is not one of {', '.join(self.allowed)}, or {self.what} 0..{self.limit - 1}")


def param(default: Any, rule: Any) -> Any:
    """A dataclass field with its default and the rule a value given in params.yaml must pass."""
    return dataclasses.field(default=default, metadata={"rule": rule})


# ----------------------------------------------------------------------------- the reader


class Problems(list):
    """Problem messages, and the dotted keys (or whole sections) whose value was refused."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: set[str] = set()

    def refuse(self, key: str, message: str) -> None:
        self.append(f"{key}: {message}")
        self.bad.add(key)

    def fine(self, *keys: str) -> bool:
        """None of `keys`, nor the section holding it, was refused: cross-checks may use them."""
        return not any(k in self.bad or k.split(".")[0] in self.bad for k in keys)


def read_section(cls: type, raw: Any, prefix: str, problems: Problems) -> Any:
    """An instance of dataclass `cls` from the YAML mapping `raw` (None: all defaults).

    Fields are read in declaration order, then unknown keys are reported, each with the
    nearest known key; `prefix` is the section's dotted name ("" at the top level)."""
    fields = dataclasses.fields(cls)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.bad.add(prefix)
        if prefix:
            problems.append(f"{prefix}: {show(raw)} is not a mapping")
        else:
            sections = ", ".join(f.name for f in fields)
            problems.append(f"top level: {show(raw)} is not a mapping; expected the sections {sections}")
        raw = {}

    def dotted(key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    values = {}
    for field in fields:
        if dataclasses.is_dataclass(field.default):  # a nested section
            values[field.name] = read_section(type(field.default), raw.get(field.name), dotted(field.name), problems)
        elif field.name not in raw:
            values[field.name] = field.default
        else:
            try:
                values[field.name] = field.metadata["rule"].check(raw[field.name])
            except Refused as refused:
                problems.refuse(dotted(field.name), str(refused))
                values[field.name] = field.default
    known = sorted(f.name for f in fields)
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key)[:100], known, n=1)
            hint = f" (did you mean {dotted(close[0])}?)" if close else ""
            problems.append(f"{dotted(name(key))}: unknown key{hint}; known keys here are {', '.join(known)}")
    return cls(**values)
