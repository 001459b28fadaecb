#!/usr/bin/env bash
# One device call: GPU tests and benchmarks, logs under $OUT.
# Usage (device machine, repo root):
#   bash scripts/gpu_check.sh [gpu|tests|bench|all] [bench suites...]
#   gpu:   only the GPU-specific tests (names containing "gpu" or "cuda"), the quickest check
#   tests: the whole suite on the GPU
#   train: python -m otlinop.bench train with the peers (carry: [".whl"]), one size per
#          piece so that a cut-off run keeps the finished rows: n = 2048 and 8192, d = 3 and 64,
#          debiased (about 3 minutes on an H100 with flash-sinkhorn's autotuning)
#          (TRAIN_SIZES="2048" and TRAIN_LIMIT=150 in the environment: fewer sizes, another limit)
#   sparse: python -m otlinop.bench sparse, beside torchsparsegradutils (its wheel in .whl)
#   profile: scripts/profile_calls.py --only train (torch.profiler tables of whole training steps)
# TESTS_LIMIT (seconds, default 480) bounds the tests mode, so that one call can run two modes:
#   TESTS_LIMIT=300 bash scripts/gpu_check.sh tests; TRAIN_SIZES=2048 bash scripts/gpu_check.sh train
# Lessons from the first full run (2026-11-23): the whole suite takes over 8 minutes on an
# H100 because every kernel configuration compiles and autotunes; run it with xdist, give
# each test its own time limit, and keep the logs, so that a cut-off run still names failures.
# With xdist (-n 8) the whole suite took 2 min 20 s (second session); with -n 16, about 5 min on an H100
# (thirteenth session: the suite grew), and a run cut by `timeout` prints no summary: keep the limits
# below with room to spare, and read $OUT/pytest.txt (-rf lists every failure at its end).
# The device machine has scipy 1.18.1 (this repository's test extra pins scipy<1.18): the scipy
# interface suite skips itself there, saying why.
# Peers: flash-sinkhorn autotunes for about 5 minutes per dimension (all its modes at
# n = 10k and 50k), so a side-by-side Sinkhorn table fits a 10-minute call one d at a
# time: python3 -m otlinop.bench sinkhorn --dims 64 --no-default-call --peer-path /tmp/site
# --peer-timeout 400 --results "$OUT/res64" (needs carry: [".whl"]).
# HVPs beside flash-sinkhorn (about 5 minutes with the cached reference):
#   bash scripts/gpu_check.sh bench hvp   (carry: [".whl", ".devcache"])
# Without .devcache/hvpref.pt the hvp suite computes its reference first and returns it as
# $OUT/hvpref.pt: copy it to .devcache/ here for the next call. The GPU tests and the
# solvers suite (its table of CG's vector work, torch operations against
# solvers._cg_step's fused kernels), about 4 minutes: bash scripts/gpu_check.sh all solvers
set -uo pipefail
what="${1:-gpu}"; shift || true
suites="${*:-plan solvers sinkhorn hvp}"
OUT="${OUT:-/tmp/otlinop-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
pytest_args=(-p no:cacheprovider -n 16 --timeout 240 -rf --tb=short)
rc=0
case "$what" in
    train)
        for n in ${TRAIN_SIZES:-2048 8192}; do
            timeout "${TRAIN_LIMIT:-200}" python3 -m otlinop.bench train --peer-path /tmp/site --sizes "$n" --dims 3 64 --debias on \
                --peer-timeout 90 --libraries otlinop otlinop-diameter flash-sinkhorn geomloss-tensorized \
                2>&1 | tee "$OUT/train_$n.md" | tail -16
        done ;;
    sparse) timeout 200 python3 -m otlinop.bench sparse 2>&1 | tee "$OUT/sparse.md" | tail -40 ;;
    gpu) timeout 420 python3 -m pytest "${pytest_args[@]}" -k "gpu or cuda" tests > "$OUT/pytest.txt" 2>&1; rc=$? ;;
    profile) timeout "${PROFILE_LIMIT:-240}" python3 scripts/profile_calls.py --only train --sizes ${PROFILE_SIZES:-2048 8192} \
        --out "$OUT/profile" 2>&1 | tail -12 ;;
    tests|all) timeout "${TESTS_LIMIT:-480}" python3 -m pytest "${pytest_args[@]}" tests > "$OUT/pytest.txt" 2>&1; rc=$? ;;
esac
if [ -f "$OUT/pytest.txt" ]; then
    grep -E "^(FAILED|ERROR)|err [0-9]|passed|failed" "$OUT/pytest.txt" | tail -60
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    for s in $suites; do
        extra=()
        # The float64 reference of the hvp suite takes minutes; keep it in the ignored
        # .devcache/ (carry: [".devcache"]) between calls.
        limit=300
        if [ "$s" = hvp ]; then
            mkdir -p .devcache && extra=(--cache .devcache/hvpref.pt)
            # Without a carried reference it is computed first (minutes), and sent back
            # under $OUT for the next call to carry.
            [ -f .devcache/hvpref.pt ] || limit=540
        fi
        timeout "$limit" python3 -m otlinop.bench "$s" "${extra[@]}" --results "$OUT/results" 2>&1 | tee "$OUT/bench_$s.md"
        if [ "$s" = hvp ] && [ "$limit" = 540 ] && [ -f .devcache/hvpref.pt ]; then
            cp .devcache/hvpref.pt "$OUT/hvpref.pt"
        fi
    done
fi
exit $rc
