#!/usr/bin/env bash
# The tests: the same set-up as run_all.sh, the demo world (built from its seed if missing), then pytest.
# The browser test of the attention browser (tests/test_browser.py) drives Debian's chromium, and the report's PDF
# is printed with it: installed here with apt-get when it is missing (tools/chromium.sh; Playwright's own browser
# download is not used). HW3_CHROMIUM=/path/to/chrome uses another build; HW3_SKIP_BROWSER_TEST=1 leaves both out.
# The tests run in two pytest-xdist workers, a test file each at a time, with one torch thread each
# (HW3_TEST_WORKERS=N for N workers, 0 for one process with torch's own threads): on the 2-core machine, 563 s
# against 749 s in one process; two workers with torch's threads each took 746 s (docs/benchmarks.md).
# Extra arguments go to pytest (e.g. ./run_tests.sh -k decoder).
set -euo pipefail
cd "$(dirname "$0")"
source tools/chromium.sh
if [[ -z "${HW3_SKIP_BROWSER_TEST:-}" ]] && ! ensure_chromium "the browser test and the report's PDF"; then
  echo "[tests] install chromium, or run without the browser tests: HW3_SKIP_BROWSER_TEST=1 ./run_tests.sh" >&2
  exit 1
fi
source tools/setup_env.sh
"$PY" -m hw3lib demo-data
workers=${HW3_TEST_WORKERS:-2}
if [[ $workers != 0 ]]; then  # each worker one thread: two workers with torch's threads each fight over the cores
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
fi
exec "$PY" -m pytest -n "$workers" --dist loadfile "$@"
