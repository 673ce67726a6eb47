#!/usr/bin/env bash
# Lints (ruff, import-linter), then runs the test suite once per Keras
# backend: the backend is fixed per process, so each backend gets its own
# pytest run.
# Usage: bash scripts/test.sh [pytest args...]
# Pick backends with BACKENDS="jax torch" bash scripts/test.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
ruff check . && ruff format --check . || exit 1
# The package's layering and private-Keras rule (pyproject.toml contracts).
lint-imports || exit 1
status=0
for backend in ${BACKENDS:-jax tensorflow torch}; do
    echo "=== KERAS_BACKEND=${backend} ==="
    KERAS_BACKEND="${backend}" python -m pytest -q -p no:cacheprovider "$@" \
        || status=1
done
exit "${status}"
