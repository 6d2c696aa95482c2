#!/usr/bin/env bash
# Run HERE (x86-64, cargo and the dev venv at hand) before a GPU check: builds ferroquant's abi3
# wheel and downloads, as wheels for the device image's Python 3.12, the packages that image
# lacks (it has torch, transformers, safetensors, pyyaml, tqdm, accelerate, pyarrow, pandas).
# Everything lands in .gpu/ (git-ignored): name it in the device run's `carry`, and run
# scripts/gpu_check.sh there (notes/CUDA.md, "What remains to prove on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FERROQUANT_VENV:-$HOME/.cache/ferroquant/venv}"
rm -rf .gpu
mkdir -p .gpu/wheels
"$VENV/bin/maturin" build --release --quiet --out .gpu/wheels
# ferroquant's own needs, the test extra's compressed-tensors, and llm-compressor with the
# dependencies the image does not hold (for gpu_bench.py --e2e's side-by-side row)
pkgs=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  compressed-tensors==0.20.0 loguru==0.7.3
  llmcompressor==0.14.0.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)
platforms=()
for n in 17 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d .gpu/wheels "${pkgs[@]}"
du -sh .gpu
ls .gpu/wheels
