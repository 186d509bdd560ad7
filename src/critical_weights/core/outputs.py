"""Atomic outputs: write under a temporary name, then rename, so a crash never leaves a
half-written file or folder that looks complete.

The temporary sibling is `.NAME.PID.XXXXXXXX.tmp`. A process killed outright (SIGKILL, out of
memory) cannot remove its own; the next write of the same target removes those whose process
is gone."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove temporary siblings of `target` left by processes that no longer run."""
    removed = []
    prefix = f".{target.name}."
    for tmp in target.parent.glob(f"{glob_escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def glob_escape(text: str) -> str:
    """`text` with glob's special characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target` (file or folder); on success it replaces `target`.

    The old target is first renamed into the temporary folder, so `target` is at every moment
    either the whole old output, the whole new one, or (between two renames) absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if target.exists() or target.is_symlink():
            os.replace(target, tmp / "old")
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Pretty, key-sorted JSON with a trailing newline, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def csv_field(value: Any) -> str:
    """One CSV field: empty for None; a float as the shortest text that reads back as the same
    float32 (9 significant digits suffice); anything else as text, quoted only when needed."""
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, ".9g")
    text = str(value)
    if any(c in text for c in ',"\n\r') or text != text.strip():
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_text(header: list[str] | tuple[str, ...], rows: list[list] | list[tuple]) -> str:
    """A whole CSV file: the header, then one line per row of `csv_field`s."""
    return "\n".join([",".join(header)] + [",".join(csv_field(v) for v in row) for row in rows]) + "\n"
