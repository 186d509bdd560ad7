"""An HTML template that makes `dvc plots show` work offline.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so every interactive plot is
blank without a network. This template inlines them instead, from the `vl-convert-python`
package (a pinned dependency; `vl_convert.javascript_bundle` returns the three libraries as
one self-contained script that defines `vegaEmbed` globally, which DVC's plot divs call).

`.dvc/config` names the template (`plots.html_template`, relative to `.dvc/`), and
`setup.sh` writes it with `critical-weights-offline-plots`; run that again if it is missing.

    critical-weights-offline-plots            # writes .dvc/tmp/offline_plots.html
"""

from __future__ import annotations

from pathlib import Path

import click

from critical_weights.core.outputs import write_text

DEFAULT_PATH = Path(".dvc") / "tmp" / "offline_plots.html"  # .dvc/config: html_template = tmp/offline_plots.html
VEGA_LITE = "v5.21"  # DVC's templates are Vega-Lite 5 specs


def bundle() -> str:
    """Vega, Vega-Lite and Vega-Embed as one script that sets window.vegaEmbed (no network)."""
    import vl_convert

    return vl_convert.javascript_bundle(vl_version=VEGA_LITE)


def template(script: str) -> str:
    """A page for DVC: the libraries inlined, then DVC's `{plot_divs}`."""
    safe = script.replace("</script", "<\\/script")  # the HTML parser would end the script there
    for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):
        if placeholder in safe:
            raise ValueError(f"the Vega bundle contains DVC's placeholder {placeholder}")
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n{refresh_tag}\n"
            "<title>critical-weights plots</title>\n<script>\n" + safe + "\n</script>\n"
            "<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n")


@click.command(help=__doc__)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_PATH, show_default=True,
              help="Where to write the template.")
def main(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, template(bundle()))
    click.echo(f"wrote {out}: dvc plots show now uses Vega, Vega-Lite and Vega-Embed from it, offline")
