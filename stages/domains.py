"""Which weights matter for which texts: critical sets per group, their overlap, cross-group damage.

From the groups' shards that domain_sensitivity wrote (DOMAINS), with no gradient pass: each
group's critical set by rank.metric (its global top-N and per-tensor top-k), the Jaccard and
Spearman overlap of every pair and against the whole, each group's specific weights, and the
damage matrix: each group's top-N zeroed, every group's held-out (and in-sample) texts
measured, with random controls.

Writes METRICS (domains.json, DVC metrics), REPORT (domains_report.json), CRITICAL (every
group's top-N as CSV), the tables behind the DVC heatmaps and three figures.

Example:

    python stages/domains.py --domains data/domains --metrics reports/domains.json \\
        --report reports/domains_report.json --critical reports/domains_critical.csv \\
        --overlap-table reports/plots/domain_overlap.csv --damage-table reports/plots/domain_damage.csv \\
        --overlap-plot reports/plots/domain_overlap.png --damage-plot reports/plots/domain_damage.png \\
        --specific-plot reports/plots/domain_specific.png
"""

from pathlib import Path

import click

from critical_weights.cli import INPUT_DIR, OUTPUT_FILE, Params, Timings, stage_command
from critical_weights.domains.stage import Outputs, run_domains


@stage_command("domains", __doc__)
@click.option("--domains", type=INPUT_DIR, required=True, help="Output of domain_sensitivity.")
@click.option("--metrics", type=OUTPUT_FILE, required=True, help="Headline JSON (DVC metrics).")
@click.option("--report", type=OUTPUT_FILE, required=True, help="Full JSON report.")
@click.option("--critical", type=OUTPUT_FILE, required=True, help="Every group's top-N, CSV.")
@click.option("--overlap-table", type=OUTPUT_FILE, required=True, help="Long CSV behind the overlap heatmap.")
@click.option("--damage-table", type=OUTPUT_FILE, required=True, help="Long CSV behind the damage heatmap.")
@click.option("--overlap-plot", type=OUTPUT_FILE, required=True, help="Overlap matrix PNG.")
@click.option("--damage-plot", type=OUTPUT_FILE, required=True, help="Damage matrix PNG.")
@click.option("--specific-plot", type=OUTPUT_FILE, required=True, help="Block x component map of specific weights PNG.")
def main(params: Params, timings: Timings, domains: Path, metrics: Path, report: Path, critical: Path,
         overlap_table: Path, damage_table: Path, overlap_plot: Path, damage_plot: Path, specific_plot: Path) -> None:
    run_domains(domains, params, Outputs(metrics, report, critical, overlap_table, damage_table, overlap_plot,
                                         damage_plot, specific_plot), timings)


if __name__ == "__main__":
    main()
