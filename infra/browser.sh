#!/usr/bin/env bash
# Debian's chromium and chromium-driver, for the console's browser test (tests/test_console.py,
# marked `browser`): installed when missing, never downloaded by Playwright or Selenium Manager.
#   infra/browser.sh install|status
set -euo pipefail

CHROMIUM="${SHOPRANK_CHROMIUM:-/usr/bin/chromium}"
DRIVER="${SHOPRANK_CHROMEDRIVER:-/usr/bin/chromedriver}"

die() { echo "browser: $*" >&2; exit 1; }
present() { [[ -x "$CHROMIUM" && -x "$DRIVER" ]]; }

install() {
  present && return 0
  [[ "$(id -u)" == 0 ]] || die "chromium is missing and installing it needs root: apt-get install chromium chromium-driver"
  echo "browser: installing Debian's chromium and chromium-driver"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || die "apt-get install chromium chromium-driver failed"
  present || die "installed, but $CHROMIUM or $DRIVER is missing"
}

status() {
  if present; then echo "browser: $("$CHROMIUM" --version 2>/dev/null | head -1) at $CHROMIUM, driver $DRIVER"
  else echo "browser: missing (infra/browser.sh install)"; return 1; fi
}

case "${1:-}" in
  install) install ;; status) status ;;
  *) echo "usage: $0 install|status" >&2; exit 2 ;;
esac
