#!/usr/bin/env bash
# The checks that need a GPU (issue 7, "Devices"), as one script for a machine with CUDA:
#   1. every property test that takes the `device` fixture, on its CUDA parametrization
#      (pytest -k cuda; Hypothesis profile "dev" unless HYPOTHESIS_PROFILE says otherwise);
#   2. the LLM checkpoint benchmark on the GPU, float32 and float64 (time and peak memory per checkpoint);
#   3. the distributed example under NCCL (one rank per GPU; with one GPU, one rank).
# Run from the repository root, with the package importable (pip install -e . or PYTHONPATH=$PWD):
#     bash benchmarks/cuda_checks.sh [LOG_DIRECTORY]
# Each part's log goes to LOG_DIRECTORY (default: $OUT if set, else a fresh temporary directory); the
# exit status is nonzero when any part failed. Environment: PYTHON (default python3), PYTEST_WORKERS
# (pytest-xdist workers, when pytest-xdist is installed), and the time limits below in seconds.
set -uo pipefail
LOGS="${1:-${OUT:-$(mktemp -d)}}"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-dev}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

"$PY" - <<'EOF' 2>&1 | tee "$LOGS/environment.log"
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i))
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: nothing to check here")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2

workers=()
if [ -n "${PYTEST_WORKERS:-}" ] && "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "$PYTEST_WORKERS"); fi
echo "== 1. property tests on CUDA (pytest -k cuda ${workers[*]})"
timeout "${PYTEST_LIMIT:-240}" "$PY" -m pytest -k cuda -q --tb=short -p no:cacheprovider -rs "${workers[@]}" 2>&1 \
    | tee "$LOGS/pytest_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. LLM checkpoints on CUDA (float32 and float64)"
timeout "${BENCH_LIMIT:-200}" "$PY" benchmarks/bench_llm_checkpoints.py --device cuda --float64 all 2>&1 \
    | tee "$LOGS/bench_llm_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 3. examples/distributed.py under NCCL"
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
timeout "${DISTRIBUTED_LIMIT:-90}" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$gpus" \
    examples/distributed.py --backend nccl 2>&1 | tee "$LOGS/distributed_nccl.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== cuda_checks: $([ $status -eq 0 ] && echo all passed || echo FAILED) (logs in $LOGS)"
exit $status
