#!/usr/bin/env bash
# Makes the wheel folder that benchmarks/device_check.sh installs on a GPU
# machine without network: the packages of requirements.txt that today's GPU
# images lack (ml-collections, grain, tensorflow-datasets, array-record and
# what they need beyond the image), for CPython 3.12 on x86-64 Linux, at the
# versions this checkout's environment runs. About 12 MiB.
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
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# shellcheck disable=SC2086
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 "${platforms[@]}" -d "$dir" $pins
du -sh "$dir"
ls "$dir"
