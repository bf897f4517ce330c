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
"$(dirname "$0")/apt-install.sh" prometheus
command -v promtool >/dev/null 2>&1 || {
  echo "error: the prometheus package is installed but promtool is not on PATH" >&2
  exit 1
}
