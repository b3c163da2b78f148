#!/usr/bin/env bash
# The Torch-Pruning baseline in its own virtual environment (transformers 4.48.3; Torch-Pruning 1.6.1 hangs on
# transformers 5.x). Writes benchmarks/torch_pruning.json, which scripts/benchmark.py adds to its table and plot.
#
#   EVAL_DATA=path/to/wiki.test.raw bash scripts/run_torch_pruning.sh [--keeps 0.8 0.5] [--windows 8]
#
# EVAL_DATA: the perplexity text (default: wikitext2 from the Hub), the same that scripts/benchmark.py scores.
#
# On a GPU machine drop the torch pin (TORCH_SPEC=torch). The venv is kept in .venv-torch-pruning/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TP_VENV:-.venv-torch-pruning}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" transformers==4.48.3 torch-pruning==1.6.1 "accelerate<1.5" gguf numpy
fi
TOKENS=$(mktemp --suffix=.pt)
trap 'rm -f "$TOKENS"' EXIT
# the evaluation token ids come from the main environment, so both environments score the very same tokens
MODEL=$(python - "$TOKENS" "${EVAL_DATA:-wikitext2}" <<'PY'
import sys, torch
from dms_llm.data import evaluation_tokens
from dms_llm.loading import load_model, resolve_source
_, tok, _ = load_model("smollm2-135m")
torch.save(evaluation_tokens(tok, sys.argv[2]), sys.argv[1])
folder, gguf, _ = resolve_source("smollm2-135m")
print(folder, gguf)
PY
)
read -r DIR GGUF <<< "$MODEL"
"$VENV/bin/python" scripts/torch_pruning_baseline.py --model-dir "$DIR" --gguf "$GGUF" --tokens "$TOKENS" \
  --out benchmarks/torch_pruning.json "$@"
