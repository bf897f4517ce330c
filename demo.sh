#!/usr/bin/env bash
# The whole pipeline on a sample, on the local stack: installs what it needs, then runs
# `attribution demo` (stack up, migrate, reference data, worker, a generated day of traffic,
# report). Extra arguments go to `attribution demo` (see `attribution demo --help`).
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
exec .venv/bin/attribution demo "$@"
