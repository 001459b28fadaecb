#!/usr/bin/env bash
# One device call: the GPU tests and the benchmarks, results under $OUT.
# Usage (device machine, repo root): bash scripts/gpu_check.sh [tests|bench|all] [bench suites...]
set -uo pipefail
what="${1:-all}"; shift || true
suites="${*:-plan solvers sinkhorn hvp}"
OUT="${OUT:-/tmp/otlinop-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
    timeout 420 python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.txt" | tail -25
    rc=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    for s in $suites; do
        timeout 300 python3 -m otlinop.bench "$s" 2>&1 | tee "$OUT/bench_$s.md"
    done
fi
exit $rc
