#!/usr/bin/env bash
# Make `promtool` available (it validates deploy/prometheus/*.yml in tests/integration/test_deploy.py).
# It ships in Debian's `prometheus` package; install that when promtool is missing. Idempotent and
# quiet: prints nothing when promtool is already on PATH. Needs root (or passwordless sudo) to
# install. Note: on a host running systemd without a policy-rc.d that blocks it, the package also
# starts a `prometheus` service on :9090 (stop it with `systemctl disable --now prometheus`).
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "error: promtool is missing and installing it needs root (apt-get install prometheus)" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
# Another apt/dpkg run (unattended upgrades, a colleague's install) holds the lock for a while:
# wait for it instead of failing. 10 tries x 15 s, plus apt's own lock timeout per try.
attempt=1
until $SUDO apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=30 prometheus \
    >/tmp/ensure-promtool.log 2>&1; do
  if [ "$attempt" -eq 1 ]; then
    # The package lists may be missing (fresh container) or stale.
    $SUDO apt-get update -q >>/tmp/ensure-promtool.log 2>&1 || true
  fi
  if [ "$attempt" -ge 10 ]; then
    echo "error: apt-get install prometheus failed; see /tmp/ensure-promtool.log" >&2
    tail -n 20 /tmp/ensure-promtool.log >&2
    exit 1
  fi
  attempt=$((attempt + 1))
  sleep 15
done

command -v promtool >/dev/null 2>&1 || {
  echo "error: the prometheus package is installed but promtool is not on PATH" >&2
  exit 1
}
