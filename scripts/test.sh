#!/usr/bin/env bash
# Run the test suite (with OpenBLAS preloaded on Linux). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec python3 -m pytest -q "$@"
