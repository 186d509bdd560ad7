"""Compare the critical weights of two runs: Jaccard index of the sets, and Spearman correlation
of the ranks of the weights both hold, overall and per tensor.

A weight is identified by (parameter, flat_index). Overall, each run's weights are ordered by
score, descending; per tensor, by their order within the tensor.

Example, two experiments that differ only in the seed that draws the texts:

    critical-weights-compare a.csv b.csv --out compare.json
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import click
import pyarrow as pa

from critical_weights.core.errors import ReportError, reported
from critical_weights.core.outputs import write_json
from critical_weights.ranking.overlap import agreement

REQUIRED = ("parameter", "flat_index", "score")


def read_critical(path: Path) -> pa.Table:
    """`parameter`, `flat_index`, `score` and, when present, `metric` of a critical_weights.csv."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise ReportError(f"{path}: not a critical_weights.csv; it lacks the column(s) {', '.join(missing)}")
            rows = []
            for row in reader:
                try:
                    rows.append((row["parameter"], int(row["flat_index"]), float(row["score"]), row.get("metric")))
                except (TypeError, ValueError):
                    raise ReportError(f"{path}: line {reader.line_num} has no integer flat_index or numeric score") from None
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{path}: is a folder, not a critical_weights.csv") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: is not UTF-8 text") from None
    if not rows:
        raise ReportError(f"{path}: holds no critical weight")
    parameter, flat_index, score, metric = zip(*rows)
    return pa.table({"parameter": pa.array(parameter, pa.string()), "flat_index": pa.array(flat_index, pa.int64()),
                     "score": pa.array(score, pa.float64()), "metric": pa.array(metric, pa.string())})


def compare(a: pa.Table, b: pa.Table) -> dict[str, Any]:
    """Agreement of two runs (see critical_weights.ranking.overlap.agreement), with each run's metrics."""
    metrics = {name: sorted({m for m in t["metric"].to_pylist() if m}) for name, t in (("a", a), ("b", b))}
    return {**agreement(a, b), "metrics_a": metrics["a"], "metrics_b": metrics["b"]}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _natural(name: str) -> list[Any]:
    """model.layers.2 before model.layers.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def format_table(result: dict[str, Any]) -> str:
    """One line per tensor (in block order), then the overall line."""
    names = sorted(result["per_tensor"], key=_natural)
    width = max([len(n) for n in names] + [len("overall")])
    lines = [f"{'tensor':<{width}}  {'n_a':>6}  {'n_b':>6}  {'shared':>6}  {'jaccard':>7}  {'spearman':>8}"]
    for name, r in [*((n, result["per_tensor"][n]) for n in names), ("overall", result)]:
        lines.append(f"{name:<{width}}  {r['n_a']:>6}  {r['n_b']:>6}  {r['n_shared']:>6}  "
                     f"{_fmt(r['jaccard']):>7}  {_fmt(r['spearman']):>8}")
    if result["metrics_a"] != result["metrics_b"]:
        lines.append(f"note: the runs rank different metrics: {', '.join(result['metrics_a'])} vs {', '.join(result['metrics_b'])}")
    return "\n".join(lines)


@click.command(help=__doc__)
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the comparison as JSON here.")
def main(a: Path, b: Path, out: Path | None) -> None:
    with reported():
        result = {"a": str(a), "b": str(b), **compare(read_critical(a), read_critical(b))}
        click.echo(format_table(result))
        if out is not None:
            write_json(out, result)


if __name__ == "__main__":
    main()
