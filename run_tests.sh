#!/usr/bin/env bash
# The tests: the same set-up as run_all.sh, the demo world (built from its seed if missing), then pytest.
# The browser test of the attention browser (tests/test_browser.py) drives Debian's chromium: installed here with
# apt-get when it is missing (Playwright's own browser download is not used). HW3_CHROMIUM=/path/to/chrome uses
# another build; HW3_SKIP_BROWSER_TEST=1 leaves the browser test out.
# Extra arguments go to pytest (e.g. ./run_tests.sh -k decoder).
set -euo pipefail
cd "$(dirname "$0")"
if [[ -z "${HW3_SKIP_BROWSER_TEST:-}" && -z "${HW3_CHROMIUM:-}" ]] && ! command -v chromium >/dev/null 2>&1 \
     && ! command -v chromium-browser >/dev/null 2>&1 && ! command -v google-chrome >/dev/null 2>&1; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo -n"
  echo "[tests] installing chromium (apt-get) for the browser test; log: /tmp/hw3-apt.log"
  if ! { DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq && \
         DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } > /tmp/hw3-apt.log 2>&1; then
    echo "[tests] could not install the package 'chromium' (apt-get, as root or with sudo; see /tmp/hw3-apt.log)." \
         "Install it, or run without the browser test: HW3_SKIP_BROWSER_TEST=1 ./run_tests.sh" >&2
    exit 1
  fi
fi
source tools/setup_env.sh
"$PY" -m hw3lib demo-data
exec "$PY" -m pytest "$@"
