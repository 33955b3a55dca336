#!/usr/bin/env bash
# The main job. On first use it sets up its environment (.venv/ unless one is active); then it runs the workbook:
# every notebook of the profile with papermill into outputs/<profile>/, HTML reports into outputs/<profile>/report/,
# the numbers into outputs/<profile>/metrics.json, and the report to hand in: outputs/<profile>/report/report.md and
# report.pdf (printed by chromium, installed with apt-get on first use when missing).
#
#   ./run_all.sh                       the demo profile (the shapes world; CPU, minutes, no downloads)
#   ./run_all.sh -f configs/hw3.yaml   the real assignment (your hw3_data/ and the real models)
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh
source tools/chromium.sh
ensure_chromium "the report's PDF" || echo "[setup] the report will be Markdown and HTML only (no PDF)" >&2
start=$SECONDS
args=("$@")
[[ " ${args[*]-} " == *" -f "* || " ${args[*]-} " == *" --config "* ]] || args=(-f configs/demo.yaml "${args[@]}")
"$PY" -m hw3lib run "${args[@]}"
echo "run_all: done in $((SECONDS - start))s"
