#!/usr/bin/env bash
# The device check for a GPU machine, in under 8 minutes: the `cuda` tests, student latency in
# torch on CUDA (FP32 and FP16, batch 1 to 1024, eager and CUDA graphs) and the tiny teacher's
# (benchmarks/gpu_latency.py), the quick demo trained and labelled on the GPU, and the latency
# report of its bundle with the teacher on the GPU in the same run (bench latency).
#
#   benchmarks/device_check.sh OUT_DIR          # run from the repository root
#
# Works on a bare machine with torch, lightning, transformers, peft, onnx and CPU onnxruntime
# and no network: the project is installed with `pip install --no-deps -e .` (or used from
# PYTHONPATH where pip may not write). Packages it lacks are installed offline from a wheel
# folder when WHEELS=DIR (or shared/wheels) holds them; a step whose modules are still missing
# is reported as skipped with the module named, never silently dropped. Every step has its
# own time limit; its log is OUT_DIR/<step>.log; figures go to OUT_DIR/<machine-id>.json|md
# (copy them into benchmarks/results/ to record the card). Exit status 1 if any step failed.
#
# Environment: BUDGET_S (seconds for the whole script, default 465), PYTHON (default python3), WHEELS (offline wheel folder), DEVICE (default cuda;
# cpu rehearses the script on a machine without a GPU), BATCHES (student batch sizes, default
# 1 4 16 64 256 1024), TEACHER_BATCHES (default 1 8 32), SKIP_INSTALL=1 (use the checkout as
# installed).
set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
batches=${BATCHES:-1 4 16 64 256 1024}
teacher_batches=${TEACHER_BATCHES:-1 8 32}
accelerator=$([ "$device" = cpu ] && echo cpu || echo gpu)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
began=$(date +%s)
budget=${BUDGET_S:-465}  # the whole script stays under 8 minutes
deadline=$(( began + budget ))
failed=()
skipped=()
summary=()

note() { echo "$*" | tee -a "$out/summary.txt"; }

# step NAME LIMIT_S COMMAND...: run with a time limit (cut to what is left of the script's
# budget), log to OUT/NAME.log, record the outcome.
step() {
    local name=$1 limit=$2
    shift 2
    local t0 rc left
    t0=$(date +%s)
    left=$(( deadline - t0 ))
    if [ "$left" -lt 15 ]; then
        skip "$name" "out of the ${budget} s budget"
        failed+=("$name")
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        summary+=("$name: ok in ${took} s")
    else
        [ $rc -eq 124 ] && echo "   (hit the ${limit} s limit)" >>"$out/$name.log"
        failed+=("$name")
        summary+=("$name: FAILED (exit $rc) in ${took} s; see $name.log")
        tail -n 25 "$out/$name.log"
    fi
    echo "   ${summary[-1]}"
}

# missing MODULE...: print the modules that do not import.
missing() {
    "$py" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

skip() {
    skipped+=("$1")
    summary+=("$1: skipped ($2)")
    echo "== $1: skipped ($2)"
}

: >"$out/summary.txt"
note "device check of $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo 'this tree') into $out"
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
    "$py" - <<'EOF'
import importlib.metadata as md
for name in ("torch", "lightning", "transformers", "peft", "onnx", "onnxruntime",
             "onnxruntime-gpu", "onnxscript", "jsonargparse", "soundfile", "soxr", "pytest",
             "matplotlib", "numpy"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
import torch
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} >"$out/context.txt" 2>&1
cat "$out/context.txt"

# -- install ----------------------------------------------------------------------------------
wheels=${WHEELS:-$repo/shared/wheels}
if [ -d "$wheels" ]; then
    # LightningCLI needs jsonargparse's `signatures` extra (docstring_parser, typeshed_client).
    want=$(missing soundfile soxr pytest matplotlib jsonargparse docstring_parser typeshed_client \
           onnxscript kaldi_native_fbank)
    if [ -n "$want" ]; then
        pkgs=$(echo "$want" | sed -e 's/kaldi_native_fbank/kaldi-native-fbank/' \
               -e 's/docstring_parser/docstring-parser/' -e 's/typeshed_client/typeshed-client/')
        # shellcheck disable=SC2086
        step wheels 60 "$py" -m pip install --no-index --find-links "$wheels" $pkgs
    fi
fi
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
    skip install "SKIP_INSTALL=1"
else
    step install 60 bash -c "'$py' -m pip install --no-deps --no-build-isolation -e . \
        || '$py' -m pip install --no-deps --no-build-isolation --break-system-packages -e . \
        || { echo 'pip could not install; the checkout is used from PYTHONPATH'; exit 0; }"
fi

# -- the cuda tests ---------------------------------------------------------------------------
if [ -n "$(missing pytest)" ]; then
    skip cuda-tests "pytest is not installed"
else
    mapfile -t files < <(grep -rlE 'mark\.cuda|"cuda" in item|pytestmark.*cuda' tests \
                         --include='test_*.py' | sort)
    if [ ${#files[@]} -eq 0 ]; then
        skip cuda-tests "no test file carries the cuda marker"
    else
        step cuda-tests 90 "$py" -m pytest -q -m cuda -p no:cacheprovider \
            --junitxml="$out/cuda-tests.xml" "${files[@]}"
    fi
fi

# -- student and teacher latency in torch on CUDA ----------------------------------------------
# shellcheck disable=SC2086
step gpu-latency 120 "$py" -m benchmarks.gpu_latency --sizes s m --device "$device" \
    --batch-sizes $batches --teacher-batch-sizes $teacher_batches --results-dir "$out"

# -- the quick demo on the GPU, then the latency report of its bundle with the teacher ---------
lack=$(missing soundfile soxr jsonargparse onnxscript matplotlib)
if [ -n "$lack" ]; then
    skip demo-quick "missing: $lack"
    skip bench-latency "needs the demo's bundle"
else
    step demo-quick 150 "$py" -c "import sys
from benchmarks.demo import demo
sys.exit(demo(out='$out/demo', quick=True, accelerator='$accelerator'))"
    if [ -f "$out/demo/bundles/s/bundle.json" ]; then
        backends=$("$py" -c "import onnxruntime as o
print('cpu cuda' if 'CUDAExecutionProvider' in o.get_available_providers() else 'cpu')")
        # shellcheck disable=SC2086
        step bench-latency 75 "$py" -m naturelm_edge bench latency "$out/demo/bundles/s" \
            --backends $backends --batch-sizes 1 8 32 --threads 1 --repeats 20 \
            --teacher "$out/demo/teacher/teacher.ckpt" --teacher-device "$device" \
            --teacher-batch-sizes 1 8 --results-dir "$out"
    else
        skip bench-latency "the demo wrote no bundle"
    fi
fi

total=$(( $(date +%s) - began ))
note ""
for line in "${summary[@]}"; do note "$line"; done
note "total ${total} s; failed: ${failed[*]:-none}; skipped: ${skipped[*]:-none}"
ls "$out"/*.md >/dev/null 2>&1 && note "figures: $(ls "$out"/*.md | xargs -n1 basename | tr '\n' ' ')"
[ ${#failed[@]} -eq 0 ]
