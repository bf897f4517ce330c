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
"$(dirname "$0")/apt-install.sh" chromium chromium-driver
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || {
  echo "error: the chromium packages are installed but /usr/bin/chromium or /usr/bin/chromedriver is not" >&2
  exit 1
}
