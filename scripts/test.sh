#!/usr/bin/env bash
# The test command: installs what the tests need into the virtual environment, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_roi_align.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${MRCNN_VENV:-.venv}/bin/python" -m pytest "$@"
