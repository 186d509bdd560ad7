"""The README opens with what the committed default run found, and every number it states there
is the committed reports' own, rounded as written: change a result and this test names the
sentence to change with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def finding() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## The finding, on the default model")
    return " ".join(text[start:text.index("\n## ", start + 1)].split())  # one line: sentences wrap anywhere


def report(name: str) -> dict:
    return json.loads((ROOT / "reports" / name).read_text(encoding="utf-8"))


def test_the_finding_is_on_the_first_screen():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.index("## The finding, on the default model") < 1500, "the finding comes right after the introduction"


def test_every_number_of_the_finding_is_the_committed_reports():
    v, s, m, c = report("validation.json"), report("superweights.json"), report("metrics.json"), report("compression.json")
    base = v["loss_heldout"]
    want = [
        f"from {c['perplexity_baseline']:.1f} to {c['wanda_ppl_50_per_row']:.1f} by `wanda`, "
        f"{c['magnitude_ppl_50_per_row']:.1f} by magnitude and {c['grad_x_weight_ppl_50_per_row']:.1f} by `grad_x_weight`",
        f"(at 2:4: {c['wanda_ppl_2_4']:,.1f}, {c['magnitude_ppl_2_4']:,.1f} and {c['grad_x_weight_ppl_2_4']:,.1f})",
        f"{m['n_texts']} corpus texts, {m['n_tokens']:,} tokens",
        f"from {base:.2f} to {base + v['zero_top1_loss_increase']:.2f} nats (+{v['zero_top1_loss_increase']:.2f})",
        f"top 10 adds {v['zero_top10_loss_increase']:.2f} nats",
        f"top 100 adds {v['zero_top100_loss_increase']:.1f}, to {base + v['zero_top100_loss_increase']:.1f} nats",
        f"(ln V = {v['ln_vocab']:.1f} nats)",
        f"{math.exp(v['ln_vocab']):,.0f}-token vocabulary",
        f"The {m['n_critical']:,} weights",
        f"{m['n_tensors']} tensors",
        f"by {v['zero_exported_loss_increase']:.2f} nats, {v['zero_exported_vs_random']:,.0f} times",
        f"`{s['strongest']}`",
        f"which is also rank {s['strongest_rank_grad_x_weight']} of all {m['n_weights'] / 1e6:.1f}M",
        f"Zeroing it adds {s['strongest_zeroed_loss_increase']:.2f} nats",
        f"({s['max_massive_activation']:,.0f} in the hidden state)",
        f"all but {s['strongest_restored_loss_increase']:.0e}".replace("e-06", "e-6"),
        f"is {v['spearman_grad_x_weight']:.2f} for `grad_x_weight`, {v['spearman_wanda']:.2f} for `wanda` and "
        f"{v['spearman_magnitude']:.2f} for `magnitude`",
        f"stays the same at only {100 * v['zero_top1_top1_agreement']:.1f}% of positions",
        f"({100 * v['zero_top10_top1_agreement']:.1f}% of predictions kept)",
        f"with {100 * v['zero_top100_top1_agreement']:.1f}% of predictions kept",
        f"(+{v['zero_exported_loss_increase']:.2f} against +{v['zero_top100_loss_increase']:.2f} nats)",
        f"keeps more predictions ({100 * v['zero_exported_top1_agreement']:.2f}% against "
        f"{100 * v['zero_top100_top1_agreement']:.1f}%)",
    ]
    text = finding()
    missing = [w for w in want if w not in text]
    assert not missing, f"README's finding no longer matches the committed reports; expected to read: {missing}"


def test_the_weight_named_row_1_of_the_csv_is_rank_1_globally():
    """critical_weights.csv is not in git (DVC tracks it); its row 1 is the global rank 1 by
    rank.metric, which superweights.json records for the weight the finding names."""
    s = report("superweights.json")
    assert s["strongest_rank_grad_x_weight"] == 1
    assert f"`{s['strongest']}`, is row 1 of `reports/critical_weights.csv`" in finding()


def test_the_domains_finding_and_table_are_the_committed_reports():
    """domains.json is in git; domains_report.json is DVC's (checked where a run left it)."""
    d = report("domains.json")
    text = finding()
    assert f"(mean Jaccard {d['mean_pairwise_jaccard']:.2f})" in text
    assert (f"({d['damage_diagonal_dominance_heldout']:.2f} ± {d['damage_diagonal_dominance_heldout_std']:.2f}"
            in text)
    full = ROOT / "reports" / "domains_report.json"
    if not full.exists():
        return
    r = json.loads(full.read_text(encoding="utf-8"))
    held = r["damage"]["heldout"]["loss_increase"]
    cells = [v for row in held for v in row]
    assert f"by {min(cells):.1f} to {max(cells):.1f} nats" in text
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    for name, row, saturated in zip(r["damage"]["groups"], held, r["damage"]["heldout"]["saturated"]):
        cells = " | ".join((f"**{v:.2f}{'*' if s else ''}**" if i == r["damage"]["groups"].index(name)
                            else f"{v:.2f}{'*' if s else ''}") for i, (v, s) in enumerate(zip(row, saturated)))
        assert f"| {name} | {cells} |" in readme, name
