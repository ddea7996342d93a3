"""Ahead-of-time compilation of the production programs for TPU slices and GPUs.

``compile_programs(config, target)`` builds the production training step and
the evaluation / predict step exactly as a training run does
(``steps.make_train_step`` / ``make_predict_step`` over a mesh of the
target's devices, at the config's global batches and precision policy) and
compiles them for devices that need not be attached:

- TPU: XLA's TPU compiler runs on any x86 host with ``libtpu`` installed
  (the ``tpu`` extra); ``jax.experimental.topologies`` gives compile-only
  devices for a slice (``v5e:2x4``, ``v5p-8``, ``v5e-32``: several hosts).
- CUDA: with a CUDA plugin installed (the ``cuda12`` / ``cuda13`` extras),
  XLA's GPU compiler runs without a GPU from a target description (an H100
  SXM here). Without a plugin the programs are only lowered to StableHLO, and
  the report says so: argument sizes and the unoptimized HLO's FLOPs, no
  compiled memory figures. XLA:GPU has no cost analysis of a compiled
  program, so a GPU report's FLOPs and bytes are always the unoptimized
  program's, and it gives no step time: unfused bytes would make a roofline
  meaningless.

Each program reports its per-device memory (arguments, outputs, temporaries,
against the chip's HBM), XLA's cost analysis (FLOPs and bytes per step) and
the step time these imply at a stated fraction of the chip's peak (a
roofline: the larger of FLOPs / peak FLOP/s and bytes / HBM bandwidth). The
peaks are the vendors' dense bf16 figures: a program of float32 matmuls at
'highest' precision runs several bf16 passes per product (6 on a TPU), which
the roofline does not model, so its estimate is a bound, not a forecast. The
TPU compiler's own estimate (``optimal_seconds``) is reported beside it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from contextpose_jax import parallel
from contextpose_jax import skeleton
from contextpose_jax import steps
from contextpose_jax.models import capf

GIB = 2**30

# The Human3.6M training split (frames), for the time per epoch.
H36M_TRAIN_FRAMES = 1_559_752


@dataclasses.dataclass(frozen=True)
class Chip:
  """One device's memory and peak rates (vendor figures: dense bf16)."""
  name: str
  hbm_bytes: int
  peak_flops: float  # FLOP/s
  hbm_bandwidth: float  # bytes/s


# By the device_kind the compiler's devices report. TPU v4 / v5p devices are
# whole chips (megacore: both TensorCores), so a device's figures are a chip's.
CHIPS = {
    "TPU v4": Chip("TPU v4", 32 * GIB, 275e12, 1.2e12),
    "TPU v5 lite": Chip("TPU v5e", 16 * GIB, 197e12, 819e9),
    "TPU v5": Chip("TPU v5p", 95 * GIB, 459e12, 2.765e12),
    "TPU v6 lite": Chip("TPU v6e", 32 * GIB, 918e12, 1.64e12),
    "NVIDIA H100 80GB HBM3": Chip("NVIDIA H100 SXM", 85_045_477_376, 989e12, 3.35e12),
}

# Slice names as Google Cloud sells them -> (libtpu topology, chips per host).
# v4 / v5p count TensorCores (two per chip); v5e / v6e count chips.
_SLICES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4",
    "v5p-8": "v5:2x2x1", "v5p-16": "v5:2x2x2", "v5p-32": "v5:2x2x4",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4",
    "v5e-32": "v5e:4x8", "v5e-64": "v5e:8x8", "v5e-256": "v5e:16x16",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4",
    "v6e-32": "v6e:4x8", "v6e-64": "v6e:8x8", "v6e-256": "v6e:16x16",
}
_GENERATIONS = ("v4", "v5", "v5e", "v6e")  # libtpu's names; 'v5' is v5p

# An H100 SXM (80 GB HBM3) for XLA's GPU compiler: the device facts its
# cost model and kernel emitters read (GpuTargetConfigProto, text format).
H100_TARGET = {
    "threads_per_block_limit": 1024, "threads_per_warp": 32,
    "shared_memory_per_block": 49152, "shared_memory_per_core": 233472,
    "shared_memory_per_block_optin": 232448, "threads_per_core_limit": 2048,
    "core_count": 132, "fpus_per_core": 128, "block_dim_limit_x": 2147483647,
    "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
    "memory_bandwidth": 3352320000000, "l2_cache_size": 52428800, "clock_rate_ghz": 1.98,
    "device_memory_size": 85045477376, "registers_per_core_limit": 65536,
    "registers_per_block_limit": 65536,
}


class TargetError(ValueError):
  """A target that cannot be compiled for here (one line, for the CLI)."""


@dataclasses.dataclass
class Target:
  """Where the programs are compiled for."""
  name: str
  platform: str  # 'tpu' | 'gpu'
  devices: list | None  # compile-only devices; None: lowering only (no plugin)
  chip: Chip | None
  num_devices: int
  num_hosts: int

  @property
  def compiles(self) -> bool:
    return self.devices is not None


def _topology(name: str) -> tuple[str, tuple[int, ...], dict]:
  """libtpu's topology name, its chip grid and the kwargs for ``name``."""
  topology = _SLICES.get(name.lower(), name)
  generation, _, shape = topology.partition(":")
  generation = {"v5p": "v5"}.get(generation.lower(), generation.lower())
  if generation not in _GENERATIONS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
    raise TargetError(
        f"--topology={name}: expected a slice such as v5e-8, v5p-8, v5e-32 or a libtpu "
        f"topology GEN:SHAPE (GEN one of v4, v5p, v5e, v6e; e.g. v5e:2x4, v5p:2x2x1)")
  grid = tuple(int(n) for n in shape.split("x"))
  kwargs = {}
  if generation in ("v4", "v5"):  # 3D tori, four chips a host, one device a chip
    if len(grid) != 3:
      raise TargetError(f"--topology={name}: {generation} slices are 3D (e.g. 2x2x1)")
    kwargs = {"chip_config_name": "megacore", "chips_per_host_bounds": (2, 2, 1)}
  else:
    if len(grid) != 2:
      raise TargetError(f"--topology={name}: {generation} slices are 2D (e.g. 2x4)")
    # Up to 8 chips share one host (v5litepod-8, v6e-8); larger slices are
    # made of 4-chip hosts.
    bounds = (grid[0], grid[1], 1) if math.prod(grid) <= 8 else (2, 2, 1)
    kwargs = {"chips_per_host_bounds": bounds}
  return f"{generation}:{shape}", grid, kwargs


_LIBTPU_NOISE = re.compile(
    r"TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|Logging before InitGoogle|"
    r"=== Source Location Trace|libtpu_init_utils|cuda_status\.cc|cuda_platform\.cc|"
    r"failed call to cuInit|^\s*$")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
  """Holds back what native code writes to stderr (fd 2) inside the block,
  then writes back the lines that are not the start-up chatter of libtpu or
  the CUDA plugin on a host without their devices."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      for line in held.read().decode(errors="replace").splitlines():
        if not _LIBTPU_NOISE.search(line):
          print(line, file=sys.stderr)


def _h100_target_config() -> str:
  fields = "\n".join(f"  {k}: {v}" for k, v in H100_TARGET.items())
  return ("gpu_device_info {\n" + fields + "\n  cuda_compute_capability { major: 9 minor: 0 }\n}\n"
          'platform_name: "CUDA"\ndevice_description_str: "NVIDIA H100 80GB HBM3"\n'
          "runtime_version { major: 13 minor: 0 }\ndnn_version_info { major: 9 minor: 20 }\n")


def _cuda_plugin_installed() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13)
             ) if importlib.util.find_spec("jax_plugins") else False


def resolve_target(topology: str | None = None, platform: str | None = None,
                   num_devices: int = 1) -> Target:
  """A TPU slice (``topology``) or ``num_devices`` H100s (``platform='cuda'``)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if (topology is None) == (platform is None):
    raise TargetError("give one of --topology (a TPU slice) or --platform=cuda")
  if topology is not None:
    name, _, kwargs = _topology(topology)
    try:
      import libtpu  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise TargetError(f"--topology={topology}: compiling for TPUs needs libtpu: "
                        "pip install 'contextpose-jax[tpu]'") from None
    # Compile-only devices never take a chip: no need for libtpu's one-process
    # lock (a training run on this TPU VM, or a second capf-compile, holds it).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with quiet_native_stderr():
      try:
        devices = topologies.get_topology_desc(name, "tpu", **kwargs).devices
      except Exception as e:  # pylint: disable=broad-except
        raise TargetError(f"--topology={topology}: libtpu does not know it "
                          f"({_first_line(e)})") from None
    kind = devices[0].device_kind
    return Target(topology, "tpu", devices, CHIPS.get(kind),
                  len(devices), len({d.process_index for d in devices}))
  if platform.lower() != "cuda":
    raise TargetError(f"--platform={platform}: only 'cuda' (TPUs: --topology)")
  if num_devices < 1:
    raise TargetError(f"--num_devices={num_devices}: must be at least 1")
  chip = CHIPS["NVIDIA H100 80GB HBM3"]
  name = f"{num_devices}x H100"
  if not _cuda_plugin_installed():
    return Target(name, "gpu", None, chip, num_devices, 1)
  with quiet_native_stderr():
    devices = topologies.get_topology_desc(
        "h100", "cuda", target_config=_h100_target_config(),
        topology=f"1x1x{num_devices}").devices
  return Target(name, "gpu", devices, chip, num_devices, 1)


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def batch_specs(global_batch: int, *, train: bool, flip_test: bool) -> dict[str, tuple]:
  """(shape, dtype) of each batch array the steps read (the pipeline's)."""
  image = ((global_batch, skeleton.CROP_HEIGHT, skeleton.CROP_WIDTH, 3), jnp.float32)
  joints2 = ((global_batch, skeleton.NUM_JOINTS, 2), jnp.float32)
  specs = dict(zip(steps.MODEL_KEYS, (image, joints2, joints2)))
  if train:
    specs["keypoints_3d"] = ((global_batch, skeleton.NUM_JOINTS, 3), jnp.float32)
    specs["mask"] = ((global_batch,), jnp.float32)  # the real rows of a padded batch
  elif flip_test:
    specs.update(zip(steps.FLIP_KEYS, (image, joints2, joints2)))
  return specs


@dataclasses.dataclass
class ProgramReport:
  """One compiled (or lowered) program, per device unless named otherwise."""
  name: str
  examples_per_step: int  # global
  compile_seconds: float
  flops: float | None  # per device, one step
  bytes_accessed: float | None
  argument_bytes: int
  output_bytes: int | None
  temp_bytes: int | None
  alias_bytes: int | None
  optimal_seconds: float | None  # the TPU compiler's own estimate
  hlo: str | None = None

  @property
  def peak_bytes(self) -> int | None:
    """Memory a device needs while the program runs."""
    if self.temp_bytes is None:
      return None
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def _cost(obj) -> dict:
  try:
    cost = obj.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend has one
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _with_sharding(tree, sharding):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def _compile(name, fn, args, target: Target, examples: int, keep_hlo: bool) -> ProgramReport:
  t0 = time.perf_counter()
  with quiet_native_stderr():
    traced = fn.trace(*args)
    if not target.compiles:
      lowered = traced.lower(lowering_platforms=("cuda",))
      cost = _cost(lowered)
      seconds = time.perf_counter() - t0
      # One device of `num_devices` holds the replicated arguments and its
      # share of the batch.
      per_device = sum(_per_device_bytes(a, target.num_devices)
                       for a in jax.tree.leaves(args))
      return ProgramReport(name, examples, seconds,
                           _div(cost.get("flops"), target.num_devices),
                           _div(cost.get("bytes accessed"), target.num_devices),
                           per_device, None, None, None, None,
                           lowered.as_text() if keep_hlo else None)
    lowered = traced.lower()
    compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  cost = _cost(compiled)
  optimal = cost.get("optimal_seconds")
  return ProgramReport(
      name, examples, seconds, cost.get("flops"), cost.get("bytes accessed"),
      memory.argument_size_in_bytes, memory.output_size_in_bytes,
      memory.temp_size_in_bytes, memory.alias_size_in_bytes,
      optimal if optimal is not None and optimal > 0 else None,
      compiled.as_text() if keep_hlo else None)


def _div(value, n):
  return None if value is None else value / n


def _per_device_bytes(spec, num_devices: int) -> int:
  size = math.prod(spec.shape) * jnp.dtype(spec.dtype).itemsize
  sharded = spec.sharding is not None and spec.sharding.spec and spec.sharding.spec[0]
  return size // num_devices if sharded else size


def build_programs(config, mesh, *, platform: str | None = None):
  """``{'train_step': (jitted, args), 'predict_step': (jitted, args)}``: the
  production steps over ``mesh`` with abstract arguments (no arrays made)."""
  model = capf.build_model(config.model)
  tx = steps.make_optimizer(config)
  # Only the schedule's constants depend on it: Human3.6M's epoch.
  steps_per_epoch = (config.steps_per_epoch if config.steps_per_epoch > 0
                     else max(H36M_TRAIN_FRAMES // config.data.batch_size, 1))
  lr_fn = steps.learning_rate_fn(config, steps_per_epoch)
  state = jax.eval_shape(lambda v: steps.create_train_state(config, model, v, tx),
                         capf.variable_shapes(model))
  state = _with_sharding(state, parallel.replicated(mesh))
  variables = _with_sharding(jax.eval_shape(lambda s: s.variables(), state),
                             parallel.replicated(mesh))

  def batch(global_batch, train):
    specs = batch_specs(global_batch, train=train, flip_test=config.flip_test)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh))
            for k, (shape, dtype) in specs.items()}

  train_step = steps.make_train_step(model, tx, lr_fn, mesh, config.model.train_backbone,
                                     platform=platform)
  predict_step = steps.make_predict_step(model, mesh, config.model.dataset, config.flip_test,
                                         platform=platform)
  return {
      "train_step": (train_step, (state, batch(config.data.batch_size, True)),
                     config.data.batch_size),
      "predict_step": (predict_step, (variables, batch(config.data.eval_batch_size, False)),
                       config.data.eval_batch_size),
  }


def compile_programs(config, target: Target, *, keep_hlo: bool = False) -> list[ProgramReport]:
  """Compiles (or, without a CUDA plugin, lowers) the production programs for
  ``target`` (its device count must divide the config's global batches:
  ``config_validation.check_fields``)."""
  if target.compiles:
    mesh = parallel.make_mesh(target.devices)
    platform = None
  else:  # lowered for CUDA over the host's first device: one device's share
    mesh = parallel.make_mesh(jax.devices()[:1])
    platform = "gpu"
  programs = build_programs(config, mesh, platform=platform)
  reports = [_compile(name, fn, args, target, examples, keep_hlo)
             for name, (fn, args, examples) in programs.items()]
  if target.compiles and target.platform == "gpu":
    # XLA:GPU has no cost analysis: the costs of the program as JAX emitted it
    # (lowered over this host's device), one GPU's share.
    unoptimized = build_programs(config, parallel.make_mesh(jax.devices()[:1]), platform="gpu")
    for report in reports:
      fn, args, _ = unoptimized[report.name]
      cost = _cost(fn.trace(*args).lower(lowering_platforms=("cuda",)))
      report.flops = _div(cost.get("flops"), target.num_devices)
      report.bytes_accessed = _div(cost.get("bytes accessed"), target.num_devices)
  return reports


@dataclasses.dataclass
class Estimate:
  step_seconds: float
  examples_per_second: float
  epoch_seconds: float  # one pass over Human3.6M's training frames
  bound: str  # 'compute' | 'memory'


def estimate(report: ProgramReport, target: Target, peak_fraction: float) -> Estimate | None:
  """The roofline step time at ``peak_fraction`` of the chip's peaks (None for
  GPUs: their costs are the unfused program's)."""
  if target.chip is None or target.platform == "gpu" or not report.flops:
    return None
  compute = report.flops / (peak_fraction * target.chip.peak_flops)
  memory = (report.bytes_accessed or 0.0) / (peak_fraction * target.chip.hbm_bandwidth)
  seconds = max(compute, memory)
  rate = report.examples_per_step / seconds
  return Estimate(seconds, rate, H36M_TRAIN_FRAMES / rate,
                  "compute" if compute >= memory else "memory")


def fits(report: ProgramReport, target: Target) -> bool | None:
  if target.chip is None or report.peak_bytes is None:
    return None
  return report.peak_bytes <= target.chip.hbm_bytes


def summary(config, target: Target, reports: list[ProgramReport],
            peak_fraction: float) -> dict[str, Any]:
  """The report as plain data (``capf-compile --json``)."""
  out = {
      "target": target.name, "platform": target.platform,
      "compiled": target.compiles, "devices": target.num_devices, "hosts": target.num_hosts,
      "chip": dataclasses.asdict(target.chip) if target.chip else None,
      "backbone": config.model.backbone,
      "precision": {k: config.model[k] for k in
                    ("matmul_precision", "lifter_dtype", "backbone_dtype")},
      "peak_fraction": peak_fraction, "jax": jax.__version__, "programs": {},
  }
  for r in reports:
    est = estimate(r, target, peak_fraction)
    per_example = r.flops * target.num_devices / r.examples_per_step if r.flops else None
    out["programs"][r.name] = {
        "global_batch": r.examples_per_step,
        "argument_bytes": r.argument_bytes, "output_bytes": r.output_bytes,
        "temp_bytes": r.temp_bytes, "alias_bytes": r.alias_bytes,
        "peak_bytes": r.peak_bytes, "fits": fits(r, target),
        "flops_per_device": r.flops, "bytes_accessed_per_device": r.bytes_accessed,
        "flops_per_example": per_example,
        "compile_seconds": round(r.compile_seconds, 2),
        "compiler_optimal_seconds": r.optimal_seconds,
        "estimate": dataclasses.asdict(est) if est else None,
    }
  return out


def _gib(n) -> str:
  return "-" if n is None else f"{n / GIB:.2f}"


def format_table(data: dict) -> str:
  """The human-readable report of ``summary``."""
  chip = data["chip"]
  how = "compiled" if data["compiled"] else "lowered only (no CUDA plugin: no compiled memory)"
  precision = ", ".join(f"{k}={v}" for k, v in data["precision"].items())
  lines = [
      f"{data['target']} ({data['devices']} devices, {data['hosts']} host"
      f"{'s' if data['hosts'] != 1 else ''}; {chip['name'] if chip else 'unknown chip'}"
      f"{f', {chip_hbm(chip)} GiB HBM' if chip else ''}), {how}; jax {data['jax']}",
      f"{data['backbone']}, {precision}",
      "",
      f"{'program':<13}{'batch':>6}{'args':>8}{'out':>8}{'temp':>8}{'total':>8}{'fits':>6}"
      f"{'GFLOP/ex':>10}{'GB/step':>9}{'step ms':>9}{'ex/s':>9}{'epoch':>8}{'xla ms':>8}"
      f"{'compile s':>10}",
  ]
  for name, p in data["programs"].items():
    est = p["estimate"]
    fit = {True: "yes", False: "NO", None: "-"}[p["fits"]]
    lines.append(
        f"{name:<13}{p['global_batch']:>6}{_gib(p['argument_bytes']):>8}"
        f"{_gib(p['output_bytes']):>8}{_gib(p['temp_bytes']):>8}{_gib(p['peak_bytes']):>8}"
        f"{fit:>6}"
        f"{_num(p['flops_per_example'], 1e9, 2):>10}"
        f"{_num(p['bytes_accessed_per_device'], 1e9, 2):>9}"
        f"{_num(est and est['step_seconds'], 1e-3, 1):>9}"
        f"{_num(est and est['examples_per_second'], 1, 0):>9}"
        f"{_duration(est and est['epoch_seconds']):>8}"
        f"{_num(p['compiler_optimal_seconds'], 1e-3, 1):>8}{p['compile_seconds']:>10.1f}")
  lines += ["", "Memory: GiB per device (arguments, outputs, temporaries; total less "
                "donated buffers)."]
  if data["platform"] == "gpu":
    lines.append("GFLOP/ex and GB/step: the program as JAX emitted it, before fusion (XLA:GPU "
                 "has no cost analysis of a compiled program), so no step time.")
  else:
    lines.append(
        f"GFLOP/ex and GB/step: XLA's cost analysis; step ms / ex/s / epoch (Human3.6M, "
        f"{H36M_TRAIN_FRAMES:,} frames): a roofline at {data['peak_fraction']:.0%} of the "
        "chip's bf16 peak and HBM bandwidth; xla ms: the TPU compiler's own estimate.")
  return "\n".join(lines)


def chip_hbm(chip: dict) -> str:
  return f"{chip['hbm_bytes'] / GIB:.0f}"


def _num(value, unit, digits) -> str:
  return "-" if value is None else f"{value / unit:,.{digits}f}"


def _duration(seconds) -> str:
  if seconds is None:
    return "-"
  minutes = seconds / 60
  return f"{minutes:.1f}m" if minutes < 90 else f"{minutes / 60:.1f}h"


def failures(data: dict) -> list[str]:
  """One line for each program that does not fit its device's memory."""
  out = []
  for name, p in data["programs"].items():
    if p["fits"] is False:
      out.append(f"{data['target']}: the {name.replace('_', ' ')} needs "
                 f"{p['peak_bytes'] / GIB:.2f} GiB per device at global batch "
                 f"{p['global_batch']}; a {data['chip']['name']} has "
                 f"{data['chip']['hbm_bytes'] / GIB:.1f} GiB")
  return out


def out_of_memory_line(error: BaseException, target: Target) -> str | None:
  """The compiler's own out-of-memory error as one line (None: another error)."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  match = re.search(r"Used ([\d.]+[KMGT]?i?B?) of ([\d.]+[KMGT]?i?B?) hbm", text)
  detail = f" (uses {match.group(1)} of {match.group(2)})" if match else ""
  return f"{target.name}: the program does not fit a device's memory{detail}"


def hlo_file_name(report: ProgramReport) -> str:
  return f"{report.name}.hlo.txt"
