#!/usr/bin/env bash
# The main job on an embedded default: installs what it needs, then runs jobs.demo
# (local S3 endpoint + local Ray cluster + synthetic archive + train + batch job +
# evaluation + pictures). Extra arguments go to `python -m jobs.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${MRCNN_VENV:-.venv}/bin/python" -m jobs.demo "$@"
