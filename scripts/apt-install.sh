#!/usr/bin/env bash
# Install Debian packages for the tests: `scripts/apt-install.sh PACKAGE...`. Used by the
# ensure-*.sh scripts once they have found something missing. Needs root (or passwordless sudo).
# Another apt/dpkg run (unattended upgrades, a colleague's install) may hold the lock for a while:
# waits for it instead of failing (10 tries x 15 s, plus apt's own lock timeout per try). Quiet;
# on failure prints the end of its log, /tmp/apt-install-<first package>.log.
set -euo pipefail

log="/tmp/apt-install-$1.log"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "error: installing $* needs root (apt-get install $*)" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
attempt=1
until $SUDO apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=30 "$@" \
    >"$log" 2>&1; do
  if [ "$attempt" -eq 1 ]; then
    # The package lists may be missing (fresh container) or stale.
    $SUDO apt-get update -q >>"$log" 2>&1 || true
  fi
  if [ "$attempt" -ge 10 ]; then
    echo "error: apt-get install $* failed; see $log" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  attempt=$((attempt + 1))
  sleep 15
done
