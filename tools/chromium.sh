# Sourced by run_all.sh (the report's PDF) and run_tests.sh (the browser test and the PDF test).
# ensure_chromium WHY: when no chromium is on PATH (nor HW3_CHROMIUM), install Debian's package with apt-get, as root
# or with sudo; returns 1, with one line saying what to do, when that is not possible. Playwright's own browser
# download is not used.
ensure_chromium() {
  [[ -n "${HW3_CHROMIUM:-}" ]] && return 0
  local name
  for name in chromium chromium-browser google-chrome; do command -v "$name" >/dev/null 2>&1 && return 0; done
  local sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo -n"
  echo "[setup] installing chromium (apt-get) for $1; log: /tmp/hw3-apt.log"
  if ! { DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq && \
         DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; } > /tmp/hw3-apt.log 2>&1; then
    echo "[setup] could not install the package 'chromium' (apt-get, as root or with sudo; see /tmp/hw3-apt.log)." >&2
    return 1
  fi
}
