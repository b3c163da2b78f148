#!/usr/bin/env bash
# One prepared GPU run (see scripts/prepare_gpu_session.sh): install the carried wheels, then
#   1. scripts/benchmark_scale.py: 7B- and 1B-shaped random Llamas, search step vs plain fwd+bwd at seq 2048, bf16,
#      plus the SmolLM2 search wall time and all-window perplexity;
#   2. scripts/benchmark.py on all windows (GPU decode speedup vs the bytes ratio);
# or, with the argument `zeroshot`: scripts/benchmark_zeroshot.py on the seven tasks' full splits (bf16, batch auto;
# resumable across calls only if $OUT's zeroshot.json is put back in benchmarks/ before the next call: finished models are kept).
# Results go to $OUT (BENCHMARKS.md, benchmarks/*.json, the plot) to be copied back and committed.
set -euo pipefail
pip install -q --no-deps .gpu/wheels/*.whl
pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
if [ "${1:-}" = zeroshot ]; then
  cp benchmarks/zeroshot.json "$OUT/" 2>/dev/null || true
  timeout 540 python scripts/benchmark_zeroshot.py --limit 0 --zeroshot-data .gpu/zeroshot --calib .gpu/wiki.valid.tokens \
    --cache-dir "$OUT/cache" --out-dir "$OUT" --markdown "$OUT/BENCHMARKS.md" || true
  ls -la "$OUT"
  exit 0
fi
timeout 300 python scripts/benchmark_scale.py --data-dir .gpu --out "$OUT/scale.json" --markdown "$OUT/BENCHMARKS.md" || true
timeout 240 python scripts/benchmark.py --windows 0 --calib .gpu/wiki.valid.tokens --eval-data .gpu/wiki.test.raw \
  --out-dir "$OUT" --markdown "$OUT/BENCHMARKS.md" || true
ls -la "$OUT"
