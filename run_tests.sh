#!/usr/bin/env bash
# The tests: the same set-up as run_all.sh, the demo world (built from its seed if missing), then pytest.
# Extra arguments go to pytest (e.g. ./run_tests.sh -k decoder).
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh
"$PY" -m hw3lib demo-data
exec "$PY" -m pytest "$@"
