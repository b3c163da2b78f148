#!/usr/bin/env bash
# One prepared GPU run (see scripts/prepare_gpu_session.sh): install the carried wheels, then
#   1. scripts/benchmark_scale.py: 7B- and 1B-shaped random Llamas, search step vs plain fwd+bwd at seq 2048, bf16,
#      plus the SmolLM2 search wall time and all-window perplexity;
#   2. scripts/benchmark.py on all windows (GPU decode speedup vs the bytes ratio).
# Results go to $OUT (BENCHMARKS.md, benchmarks/*.json, the plot) to be copied back and committed.
set -euo pipefail
pip install -q --no-deps .gpu/wheels/*.whl
pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
timeout 300 python scripts/benchmark_scale.py --data-dir .gpu --out "$OUT/scale.json" --markdown "$OUT/BENCHMARKS.md" || true
timeout 240 python scripts/benchmark.py --windows 0 --calib .gpu/wiki.valid.tokens --eval-data .gpu/wiki.test.raw \
  --out-dir "$OUT" --markdown "$OUT/BENCHMARKS.md" || true
ls -la "$OUT"
