#!/usr/bin/env bash
# keras_lora's GPU validation pack: run on a CUDA machine from the repo root,
# with the wheel bundle from scripts/gpu_bundle.sh beside the code
# (.gpu_bundle/). It installs the bundle into a temporary folder, then, for
# KERAS_BACKEND=jax and torch, within one time budget (--budget SECONDS,
# default 480; 1200 for a dry run):
#   (a) the GPU-relevant tests, (b) MemoryUsage on the device allocator,
#   (c) W1/W2 training steps (full fine-tuning, Keras built-in LoRA,
#       keras_lora, PEFT; float32 and mixed bfloat16): step time and peak
#       device memory, (d) routed vs looped generation for 32 adapters.
# Results: OUT/gpu_check.json, OUT/gpu_check.md, OUT/gpu_check.log. A failed
# step is recorded and the next one runs; steps the budget cannot fit are
# recorded as skipped. Exit 0 all passed, 1 a step failed or timed out (or
# the bundle did not install), 2 some were skipped.
#
# Usage: bash scripts/gpu_check.sh --out DIR [--dry-run] [--budget SECONDS]
#            [--bundle DIR] [--backends jax,torch] [--units a,b,...]
#   --dry-run: the same steps at tiny sizes on the CPU (what CI runs); it
#   installs the bundle only when --bundle is given.
#
# On this project's device tool (the H200 machine), in one call:
#   run(command='bash scripts/gpu_check.sh --out "$OUT"',
#       carry=[".gpu_bundle"], timeout_s=600)
# after `bash scripts/gpu_bundle.sh` here; then commit OUT's files under
# benchmarks/results/gpu-<date>/.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s.%N)
command_line="bash scripts/gpu_check.sh $*"
out="" bundle=".gpu_bundle" bundle_given=0 dry_run=0 rest=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="${2:?--out needs a folder}"; shift 2 ;;
        --bundle) bundle="${2:?--bundle needs a folder}"; bundle_given=1
            shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) rest+=("$1"); shift ;;
    esac
done
if [ -z "$out" ]; then
    echo "gpu_check.sh: --out DIR is required (where the results go)" >&2
    exit 64
fi
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
trap 'rm -rf "$site"' EXIT
log="$out/gpu_check.log"
: >"$log"
say() { echo "$*" | tee -a "$log"; }

if [ "$dry_run" = 0 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi 2>&1 | tee -a "$log"
fi
shopt -s nullglob
wheels=("$bundle"/*.whl)
if [ "$dry_run" = 1 ] && [ "$bundle_given" = 0 ]; then
    bundle_status="absent:dry run, the installed packages run (--bundle DIR \
installs one)"
elif [ ${#wheels[@]} -gt 0 ]; then
    say "== installing ${#wheels[@]} wheels from $bundle into $site =="
    if "$python" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$site" "${wheels[@]}" 2>&1 \
        | tee -a "$log"; then
        bundle_status="installed:${#wheels[@]} wheels from $bundle"
    else
        bundle_status="failed:pip install of $bundle failed (see the log)"
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
elif "$python" -c "import keras, keras_hub" 2>/dev/null; then
    bundle_status="absent:no bundle in $bundle; keras and keras-hub are installed"
else
    bundle_status="failed:no bundle in $bundle and keras/keras-hub are not \
installed: run scripts/gpu_bundle.sh on a machine with network first"
fi
say "== bundle: $bundle_status =="
flags=()
[ "$dry_run" = 1 ] && flags+=(--dry-run)
"$python" -m benchmarks.gpu_check --out "$out" \
    --started "$started" --bundle-status "$bundle_status" \
    --command "$command_line" "${flags[@]}" "${rest[@]}" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
