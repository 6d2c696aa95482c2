#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) the virtual environment, installs
# the dependencies, builds the Rust extension, then runs the job asked for.
#
#   scripts/bootstrap.sh demo [args]   quantize SmolLM2-135M, perplexity + generation before/after
#   scripts/bootstrap.sh test          ruff, cargo test (Rust core), pytest (everything else)
#   scripts/bootstrap.sh env           only install; prints the venv's python
#
# The venv lives outside the checkout (FERROQUANT_VENV, default ~/.cache/ferroquant/venv) so
# the large torch download is paid once per machine; pip's own cache serves rebuilds.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FERROQUANT_VENV:-$HOME/.cache/ferroquant/venv}
job=${1:-test}
shift || true

if ! command -v cargo >/dev/null 2>&1; then
  echo "ferroquant: cargo (the Rust toolchain) is needed to build the extension: https://rustup.rs" >&2
  exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "ferroquant: creating virtual environment at $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check --upgrade pip "maturin>=1.16,<2"
# maturin installs the project's dependencies (and the `test` extra) before the editable build.
cd "$root"
VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" \
  "$venv/bin/maturin" develop --release --quiet --extras test,gguf,interop

case "$job" in
  env)
    echo "$py"
    ;;
  demo)
    exec "$py" -m ferroquant.demo "$@"
    ;;
  test)
    "$py" -m ruff check --quiet python tests benches
    cargo test -p ferroquant-core --release --quiet
    exec "$py" -m pytest -q "$@" tests
    ;;
  *)
    echo "usage: scripts/bootstrap.sh demo|test|env" >&2
    exit 2
    ;;
esac
