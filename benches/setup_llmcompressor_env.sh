#!/usr/bin/env bash
# A virtual environment for llm-compressor, the reference bench_e2e.py compares against.
#
# llmcompressor 0.14 pins torch<=2.14 / transformers<=5.17 / compressed-tensors==0.19, older than
# ferroquant's environment; installing it there would downgrade what ferroquant is tested with.
# Instead this venv sees ferroquant's site-packages through a .pth file (appended to sys.path, so
# its own packages win) and holds only llm-compressor, compressed-tensors 0.19 and the few
# packages they add. Both sides of the comparison then run on the very same torch build.
#
#   benches/setup_llmcompressor_env.sh [FERROQUANT_VENV] [BENCH_VENV]
set -euo pipefail
main=${1:-${FERROQUANT_VENV:-$HOME/.cache/ferroquant/venv}}
bench=${2:-$HOME/.cache/ferroquant/bench-venv}
base=$("$main/bin/python" -c 'import sys; print(sys._base_executable)')
site_main=$("$main/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -x "$bench/bin/python" ] || "$base" -m venv "$bench"
site_bench=$("$bench/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site_main" > "$site_bench/zz_ferroquant_main_venv.pth"
"$bench/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
  llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round==0.15.1 \
  datasets dill multiprocess pyarrow pandas xxhash nvidia-ml-py pillow python-dateutil tzdata \
  py-cpuinfo loguru
"$bench/bin/python" -c 'import llmcompressor, torch; print("llmcompressor", llmcompressor.__version__, "torch", torch.__version__)'
echo "$bench/bin/python"
