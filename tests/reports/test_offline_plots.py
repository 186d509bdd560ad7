"""critical_weights.reports.offline_plots: the template inlines the Vega libraries safely (no
early </script>, no DVC placeholder inside them) and leaves DVC's own placeholders in place."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from critical_weights.reports import offline_plots


def test_template_escapes_script_ends_and_keeps_dvcs_placeholders():
    page = offline_plots.template("var a = '</script>';")
    assert "<\\/script>'" in page and page.count("</script>") == 1
    for placeholder in ("{plot_divs}", "{refresh_tag}"):
        assert page.count(placeholder) == 1


def test_a_bundle_holding_a_placeholder_is_refused():
    with pytest.raises(ValueError, match=r"placeholder \{plot_divs\}"):
        offline_plots.template("x = '{plot_divs}'")


def test_main_writes_the_page_with_the_bundle_inlined(tmp_path):
    out = tmp_path / "deep" / "plots.html"
    result = CliRunner().invoke(offline_plots.main, ["--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert "vegaEmbed" in page and "{plot_divs}" in page and "http" not in page.split("<script>")[0]
    assert f"wrote {out}" in result.output
