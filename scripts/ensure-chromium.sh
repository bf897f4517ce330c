#!/usr/bin/env bash
# Make headless Chromium and its WebDriver available (tests/integration/test_browser.py drives the
# browser snippet through them). Both come from Debian: `chromium` and `chromium-driver`, never a
# downloaded browser. Installs them when either is missing. Idempotent and quiet: prints nothing
# when /usr/bin/chromium and /usr/bin/chromedriver are already there. Needs root (or passwordless
# sudo) to install.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "error: chromium or chromedriver is missing and installing them needs root" \
      "(apt-get install chromium chromium-driver)" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
# Another apt/dpkg run (unattended upgrades, a colleague's install) holds the lock for a while:
# wait for it instead of failing. 10 tries x 15 s, plus apt's own lock timeout per try.
attempt=1
until $SUDO apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=30 \
    chromium chromium-driver >/tmp/ensure-chromium.log 2>&1; do
  if [ "$attempt" -eq 1 ]; then
    # The package lists may be missing (fresh container) or stale.
    $SUDO apt-get update -q >>/tmp/ensure-chromium.log 2>&1 || true
  fi
  if [ "$attempt" -ge 10 ]; then
    echo "error: apt-get install chromium chromium-driver failed; see /tmp/ensure-chromium.log" >&2
    tail -n 20 /tmp/ensure-chromium.log >&2
    exit 1
  fi
  attempt=$((attempt + 1))
  sleep 15
done

[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || {
  echo "error: the chromium packages are installed but /usr/bin/chromium or /usr/bin/chromedriver is not" >&2
  exit 1
}
