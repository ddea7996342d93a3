#!/usr/bin/env bash
# The GPU check of issue 25, for one run on an H100 machine of today's GPU
# images: no network, its own python3 (3.12) with jax 0.11.x + the CUDA 13
# plugin, flax / optax / orbax and torch, but no ml-collections, grain,
# tensorflow-datasets or array-record. Those come from the wheel folder that
# benchmarks/device_wheels.sh makes here (.whl, ~11 MiB) and are installed
# beside the image's packages, which stay as they are. At most ~8 minutes.
#
#   benchmarks/device_wheels.sh                     # here, once
#   bash benchmarks/device_check.sh [OUT_DIR]       # there, from the checkout
#
# Steps (each log under OUT_DIR, default $OUT or /tmp/capf-device-check):
#   1. the imports, and the devices JAX and torch see;
#   2. a GPU subset of the tests: parity with torch at fp32 / 'highest', the
#      error bound of the fast setting (bf16), one production training step,
#      predict on examples/;
#   3. benchmarks.speed against torch on the same GPU: the full model at
#      batch 64 (fp32 and the bf16 backbone) and the production training step
#      at batch 256, with each framework's peak device memory.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/capf-device-check}}
mkdir -p "$out"
status=0
step() { echo "== $*" | tee -a "$out/summary.txt"; }

step "install the carried wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/capf-site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/capf-site:$PWD PYTHONUNBUFFERED=1

step "imports and devices"
timeout 120 python3 - <<'PY' 2>&1 | tee "$out/imports.log" || status=1
import jax, flax, optax, orbax.checkpoint, grain, tensorflow_datasets, ml_collections, torch
from contextpose_jax import api, train, aot, predict  # noqa: F401
print("jax", jax.__version__, jax.devices(), "| flax", flax.__version__, "| optax", optax.__version__)
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
assert jax.default_backend() == "gpu", jax.default_backend()
PY

step "GPU test subset"
timeout 240 python3 -m pytest -q -p no:cacheprovider \
  tests/test_lifter.py::test_lifter_matches_torch \
  tests/test_hrnet.py::test_tiny_parity_float32 \
  tests/test_hrnet.py::test_tiny_identical_function_in_float64 \
  tests/test_precision.py::test_bf16_accuracy_against_float32 \
  tests/test_train.py::test_frozen_backbone_step_and_nan_guard \
  tests/test_predict.py::test_single_image_matches_predictor_and_torch \
  2>&1 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "speed against torch on the GPU"
timeout 300 python3 -m benchmarks.speed --rows=model,train_step --backbones=hrnet_32 \
  --batch_sizes=64 --dtypes=float32,bfloat16 --nounfolded --train_step_batch=256 \
  --warmup=3 --repeats=10 --json="$out/speed.json" 2>&1 | tee "$out/speed.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
step "exit status $status"
exit $status
