#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) the virtual environment, installs
# what the job needs, builds the Rust extension, then runs the job asked for.
#
#   scripts/bootstrap.sh demo [args]   quantize SmolLM2-135M, perplexity + generation before/after
#                                      (installs the runtime and the `gguf` extra)
#   scripts/bootstrap.sh test [args]   ruff, cargo test (Rust core), pytest (everything else)
#                                      (also the `test` and `interop` extras: several GB more)
#   scripts/bootstrap.sh env           the test job's install only; prints the venv's python
#
# The venv lives outside the checkout (FERROQUANT_VENV, default ~/.cache/ferroquant/venv) so
# the large torch download is paid once per machine; pip's own cache serves rebuilds.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FERROQUANT_VENV:-$HOME/.cache/ferroquant/venv}
job=${1:-test}
shift || true

case "$job" in
  demo) extras=gguf ;;
  test|env) extras=gguf,test,interop ;;
  *)
    echo "usage: scripts/bootstrap.sh demo|test|env" >&2
    exit 2
    ;;
esac
say() { echo "ferroquant: $*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  say "cargo (the Rust toolchain) is needed to build the extension: https://rustup.rs"
  exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment at $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check --upgrade pip "maturin>=1.16,<2"

# The requirements of pyproject.toml (runtime + the job's extras), installed here with pip's
# own progress output rather than silently inside the build step.
mapfile -t reqs < <("$py" - "$root/pyproject.toml" "$extras" <<'EOF'
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project["dependencies"])
for extra in sys.argv[2].split(","):
    reqs += project["optional-dependencies"][extra]
print("\n".join(reqs))
EOF
)
names=$(printf '%s\n' "${reqs[@]}" | sed 's/[<>=!~ ;[].*//' | sort -u | paste -sd' ' -)
say "installing the Python dependencies (extras: $extras): $names"
[ "$job" = demo ] || say "(the test extras include gptqmodel, built from source: the longest step)"
"$py" -m pip install --disable-pip-version-check "${reqs[@]}"

# `cargo test` below shares this build's target directory (CARGO_TARGET_DIR or ./target) and
# release profile, and selects the extension crate too (it has no Rust tests), so dependency
# features resolve as in this build and every compiled dependency is reused: only the core's
# test harness is compiled again.
cd "$root"
say "building the Rust extension (cargo, release profile; the first build takes several minutes)"
VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" "$venv/bin/maturin" develop --release

case "$job" in
  env)
    echo "$py"
    ;;
  demo)
    exec "$py" -m ferroquant.demo "$@"
    ;;
  test)
    say "ruff"
    "$py" -m ruff check --quiet python tests benches
    say "cargo test of the Rust core (release profile, the build directory above)"
    cargo test -p ferroquant-core -p ferroquant-python --release --quiet
    say "pytest"
    exec "$py" -m pytest -q "$@" tests
    ;;
esac
