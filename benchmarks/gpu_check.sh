#!/usr/bin/env bash
# GPU check of edgeinfer's torch engine, in one go, within 10 minutes (issue 15, part 5).
#
#   benchmarks/gpu_check.sh            # on a CUDA machine: install, CUDA tests, decode vs roofline
#   benchmarks/gpu_check.sh --cpu      # dry run of the same steps on CPU with a small model (no install)
#
# Steps, each under a time guard (the whole run stops at BUDGET seconds, default 570):
#   1. install: a venv (.venv-gpu) with a CUDA build of torch (TORCH_INDEX, default cu128 wheels) and
#      `pip install -e ".[test]"` (triton comes with the test extra on Linux x86-64); --cpu uses the
#      current interpreter ($PYTHON, default .venv/bin/python or python3) and installs nothing;
#   2. the CUDA tests: tests/test_kernels_triton.py compiled for the GPU (EDGEINFER_TRITON_CUDA=1) and
#      every test whose name says cuda/gpu (the others skip themselves without a device);
#      --cpu runs the Triton tests under the interpreter (TRITON_INTERPRET=1) instead;
#   3. benchmarks/gpu_check.py: a generated 1B-class Llama (hidden 2048, 16 layers) converted to
#      Q4_K_M and Q4_0 with `edgeinfer convert`, the torch engine's decode tok/s on the device next to
#      the roofline (bytes per token / the device's measured copy bandwidth); --cpu: hidden 256, 2 layers.
# Exit status: 0 when every step passed, else the first failing step's status (124 = out of time).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUDGET="${BUDGET:-570}"
MODE=cuda
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
START=$SECONDS
STATUS=0

finish() {
    echo "== gpu_check: status $STATUS after $(( SECONDS - START )) s (budget ${BUDGET}s)"
    exit "$STATUS"
}

left() { echo $(( BUDGET - (SECONDS - START) )); }

# run NAME MAX_SECONDS CMD...: run CMD with at most min(MAX_SECONDS, what is left) seconds
run() {
    local name="$1" max="$2"; shift 2
    local l; l=$(left)
    (( l < max )) && max=$l
    if (( max <= 5 )); then
        echo "== $name: skipped, out of time"; [[ $STATUS == 0 ]] && STATUS=124; return 124
    fi
    echo "== $name (limit ${max}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$max" "$@"
    local rc=$?
    echo "== $name: rc=$rc, $(( SECONDS - t0 )) s"
    [[ $rc != 0 && $STATUS == 0 ]] && STATUS=$rc
    return $rc
}

if [[ $MODE == cuda ]]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    VENV="${VENV:-$ROOT/.venv-gpu}"
    TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
    if [[ ! -x "$VENV/bin/python" ]]; then
        run "venv" 60 python3 -m venv "$VENV" || finish
    fi
    PY="$VENV/bin/python"
    run "install torch (CUDA)" 240 "$PY" -m pip install -q --index-url "$TORCH_INDEX" torch || finish
    run "install edgeinfer[test]" 240 "$PY" -m pip install -q -e ".[test]" || finish
    run "torch sees CUDA" 60 "$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))" || finish
    run "CUDA tests" 150 env EDGEINFER_TRITON_CUDA=1 "$PY" -m pytest -q -rs -p no:cacheprovider \
        tests/test_kernels_triton.py
    run "other CUDA tests" 90 "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda tests/test_quantizers.py
    run "decode vs roofline" "$(( $(left) - 5 ))" "$PY" benchmarks/gpu_check.py --device cuda --budget "$(( $(left) - 15 ))"
else
    PY="${PYTHON:-$ROOT/.venv/bin/python}"
    [[ -x "$PY" ]] || PY=python3
    run "torch present" 60 "$PY" -c "import torch; print(torch.__version__, 'cuda' if torch.cuda.is_available() else 'no cuda (dry run)')" || finish
    run "Triton tests (interpreter)" 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels_triton.py
    run "decode vs roofline (small model, CPU)" 200 "$PY" benchmarks/gpu_check.py --device cpu --small --seconds 2 \
        --budget 180
fi
finish
