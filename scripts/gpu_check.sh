#!/usr/bin/env bash
# One prepared GPU check of the INT4 kernels (target: under 8 minutes on one H200):
#   1. native kernel tests (compiled Triton kernels vs the jnp references, forward and gradients),
#   2. benchmarks of int4_gmm and int4_matmul against XLA dequantize-then-dot and bf16 dot / ragged_dot,
#      with a small sweep of Triton block sizes at decode shapes.
# Results land in OUT_DIR: summary.md (targets met or not + tables), env.txt, native_tests.txt or
# native_checks.txt, int4_{gmm,matmul}.{json,md}, gpu_check.log.
#
# Usage:  scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_results)
#
# Expects python3 (3.10+) with jax and a CUDA plugin (e.g. `pip install "jax[cuda12]"`) and numpy; pytest is
# optional (without it the same cases run through scripts/gpu_check.py). The repository's other deps (flax,
# torch, ...) are not needed. If jax is missing and a wheel directory exists ($WHEELS, default ./wheels), it
# is installed from there offline. Set PYTHON to choose the interpreter; GPU_CHECK_ARGS passes options to
# scripts/gpu_check.py (e.g. "--quick --no-sweep" for a smoke test, which also runs on CPU in interpret mode).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_results}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
LOG="$OUT_DIR/gpu_check.log"
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$LOG"; }
START=$(date +%s)

if ! "$PY" -c "import jax, numpy" 2>/dev/null; then
  WHEELS="${WHEELS:-wheels}"
  if [ -d "$WHEELS" ]; then
    log "installing jax, numpy (and pytest if present) from $WHEELS"
    "$PY" -m pip install --no-index --find-links "$WHEELS" jax jaxlib numpy >>"$LOG" 2>&1
    "$PY" -m pip install --no-index --find-links "$WHEELS" jax-cuda12-plugin jax-cuda12-pjrt >>"$LOG" 2>&1 \
      || "$PY" -m pip install --no-index --find-links "$WHEELS" jax-cuda13-plugin jax-cuda13-pjrt >>"$LOG" 2>&1
    "$PY" -m pip install --no-index --find-links "$WHEELS" pytest >>"$LOG" 2>&1 || true
  fi
  if ! "$PY" -c "import jax, numpy" 2>/dev/null; then
    log "FAILED: $PY cannot import jax and numpy; install jax with CUDA support (pip install 'jax[cuda12]')"
    exit 2
  fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee -a "$LOG"

SKIP=()
if "$PY" -c "import pytest" 2>/dev/null; then
  log "native kernel tests (pytest -m gpu)"
  # -o addopts= and no cache: the repo's pytest.ini options stay harmless on a bare machine
  timeout 200 "$PY" -m pytest tests/kernels/test_int4_native.py -m gpu -q -p no:cacheprovider -o addopts="-ra" \
    >"$OUT_DIR/native_tests.txt" 2>&1
  log "pytest exit status $? ($(tail -n 1 "$OUT_DIR/native_tests.txt"))"
  SKIP=(--skip-checks)
else
  log "pytest not installed: gpu_check.py runs the same native cases itself"
fi

USED=$(( $(date +%s) - START ))
BUDGET=$(( 450 - USED ))
log "benchmarks (budget ${BUDGET}s)"
timeout $(( BUDGET + 30 )) "$PY" scripts/gpu_check.py --out "$OUT_DIR" --budget "$BUDGET" "${SKIP[@]}" ${GPU_CHECK_ARGS:-} 2>&1 \
  | tee -a "$LOG" | tail -n 40
log "done in $(( $(date +%s) - START ))s; results in $OUT_DIR (summary.md)"
