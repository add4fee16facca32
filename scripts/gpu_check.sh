#!/usr/bin/env bash
# The GPU checks in one run, on a machine with a CUDA device and a CUDA build of PyTorch
# (no network needed; fastmode runs from this checkout with that machine's python3):
#   1. tests/test_device.py: the engine on the GPU in bfloat16 and float32, lanes bit-identical;
#   2. `fastmode bench --compare --device cuda`: both lanes' decode speed on the GPU with the
#      given GGUF (the default model's: `fastmode pull` prints where it is), 8 streams against
#      one, pass cost by rows, device memory bandwidth; report and page in OUTDIR.
# Python packages it needs: torch, numpy, tokenizers, jinja2, tqdm, matplotlib, pytest and
# starlette (pure Python: carry its wheel where the machine has no package index).
# Usage: bash scripts/gpu_check.sh MODEL.gguf [OUTDIR] [DTYPE]
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=${1:?usage: bash scripts/gpu_check.sh MODEL.gguf [OUTDIR] [DTYPE]}
out=${2:-gpu-check}
dtype=${3:-bfloat16}
py=${PYTHON:-python3}
mkdir -p "$out"
"$py" -c "import torch, numpy, tokenizers, jinja2, tqdm, matplotlib, pytest, starlette" || {
  echo "gpu_check: a package above is missing from $py" >&2; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt" || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" \
  | tee -a "$out/gpu.txt"
# --noconftest: the shared fixtures start HTTP servers, which need packages a GPU image may lack
"$py" -m pytest -q --noconftest -p no:cacheprovider tests/test_device.py 2>&1 | tee "$out/tests.log"
"$py" -m fastmode.cli bench --compare --device cuda --dtype "$dtype" --model "$gguf" --repeats 1 --streams 8 \
  --out "$out" --page "$out/benchmarks-gpu.md" 2>&1 | tee "$out/compare.log"
