#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, starts the local stack (real
# Kafka broker + ClickHouse server), runs unit and integration tests, and stops the stack again
# if it was not running before. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
