#!/usr/bin/env bash
# Install PyTorch into the virtual environment whose pip is $1, without ever pulling the
# multi-GB CUDA build onto a machine that has no NVIDIA GPU.
#   GPU machine (nvidia-smi works): the default PyPI build.
#   CPU machine: the "+cpu" wheel (found locally through pip's find-links where a machine ships
#   one), else PyTorch's CPU index.
set -euo pipefail
pip="$1"
version="${TORCH_VERSION:-2.13.0}"
if "$pip" show torch >/dev/null 2>&1; then
  echo "torch already installed: $("$pip" show torch | awk '/^Version/{print $2}')"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$pip" install "torch==${version}"
else
  "$pip" install "torch==${version}+cpu" 2>/dev/null \
    || "$pip" install "torch==${version}" --index-url https://download.pytorch.org/whl/cpu
fi
