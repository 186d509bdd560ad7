"""Each group of texts' own gradient and scores: the first half of the grouped analysis.

Groups the texts of SOURCE (`domains.source`) by `domains.field` (a domain, a language; for a
folder, the subfolder), draws each group's in-sample and held-out texts with `seed`, and
computes each group's own gradient and every metric of `sensitivity.metrics` with the
sensitivity stage's code into per-group shards under OUT, with the groups' token ids in
OUT/groups.json. The whole (every group's in-sample texts) is scored from the token-weighted
sum of the group gradients, with no pass of its own. The `domains` stage reads OUT.

Example:

    python stages/domain_sensitivity.py --prepared data/prepared --source data/texts/domains.jsonl \\
        --out data/domains
"""

from pathlib import Path

import click

from critical_weights.cli import INPUT_DIR, PATH, Params, Timings, stage_command
from critical_weights.domains.gradients import run_domain_sensitivity


@stage_command("domain_sensitivity", __doc__)
@click.option("--prepared", type=INPUT_DIR, required=True, help="Output of prepare (its tokenizer).")
@click.option("--source", type=PATH, required=True, help="domains.source, the labelled texts.")
@click.option("--out", type=PATH, required=True, help="Folder for each group's shards, the whole's and groups.json.")
def main(params: Params, timings: Timings, prepared: Path, source: Path, out: Path) -> None:
    run_domain_sensitivity(prepared, source, params, out, timings)


if __name__ == "__main__":
    main()
