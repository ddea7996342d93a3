#!/usr/bin/env bash
# Makes the wheel folder that benchmarks/device_check.sh installs on a GPU
# machine without network: the packages of requirements.txt that today's GPU
# images lack (ml-collections, grain, tensorflow-datasets, array-record and
# what they need beyond the image), at the versions this checkout's
# environment runs. Run it with a CPython 3.12 on x86-64 Linux (the images').
#
#   benchmarks/device_wheels.sh [DIR]     # default: .whl (git-ignored)
#
# Versions come from the environment of the python it runs (default
# .venv/bin/python; PYTHON=... to choose another).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
python=${PYTHON:-.venv/bin/python}
packages=(ml-collections grain tensorflow-datasets array-record dm-tree promise
          simple-parsing docstring-parser tensorflow-metadata toml termcolor
          immutabledict googleapis-common-protos importlib-resources etils)
pins=$("$python" - "${packages[@]}" <<'PY'
import importlib.metadata as m, sys
print(" ".join(f"{name}=={m.version(name)}" for name in sys.argv[1:]))
PY
)
rm -rf "$dir" && mkdir -p "$dir"
# Wheels for this interpreter's platform (CPython 3.12, x86-64 Linux, as the
# images'); sdist-only packages (promise) are built into pure-Python wheels.
# shellcheck disable=SC2086
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$dir" $pins
du -sh "$dir"
ls "$dir"
