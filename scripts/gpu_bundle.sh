#!/usr/bin/env bash
# Downloads, for the GPU machine (CPython 3.12, x86-64 Linux, no network),
# the wheels this project needs that it lacks: keras, keras-hub and their
# missing dependencies, at the versions installed here, plus this project
# built as a wheel. They land in the git-ignored folder .gpu_bundle/; the
# script checks that every requirement is met there or on the machine and
# prints the bundle's size and the total that travels to the GPU machine
# (git ls-files + bundle, limit 64 MiB).
#
# Usage: bash scripts/gpu_bundle.sh [--dir DIR] [--pin NAME==VERSION]...
#        bash scripts/gpu_bundle.sh --check-only     # sizes, no download
# Then run the pack there: see scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m benchmarks.gpu_bundle "$@"
