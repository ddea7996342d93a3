"""Programs for TPUs and GPUs, compiled on this CPU (contextpose_jax/aot.py,
`capf-compile`): the platform code follows the program's devices, the
precision policy reaches the program, and XLA's real TPU compiler compiles the
production steps of a small config."""
import collections
import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import pytest

from configs import tiny_test
from contextpose_jax import aot
from contextpose_jax import compile as compile_cli
from contextpose_jax import compiler_options
from contextpose_jax import parallel
from contextpose_jax.models import materialize

FAST = ("--config.model.matmul_precision=default", "--config.model.lifter_dtype=bfloat16",
        "--config.model.backbone_dtype=bfloat16")


def _config(fast: bool = False):
  config = tiny_test.get_config()
  if fast:
    config.model.matmul_precision = "default"
    config.model.lifter_dtype = "bfloat16"
    config.model.backbone_dtype = "bfloat16"
  return config


def _primitives(jaxpr, counts=None) -> collections.Counter:
  """Primitive counts of a jaxpr and every jaxpr nested in it."""
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    counts[eqn.primitive.name] += 1
    for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else _subjaxprs(eqn):
      _primitives(sub, counts)
  return counts


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      inner = getattr(item, "jaxpr", None)
      if inner is not None:
        yield getattr(inner, "jaxpr", inner)


class _CallCounter:
  """Counts the calls of a materialize barrier that inserted something."""

  def __init__(self, monkeypatch, name):
    self.count = 0
    original = getattr(materialize, name)

    def counted(x):
      out = original(x)
      self.count += out is not x
      return out
    monkeypatch.setattr(materialize, name, counted)
    # The model modules imported the module, not the function: patched there too.


def _traced_counts(config, mesh, platform, monkeypatch):
  barriers = _CallCounter(monkeypatch, "materialized")
  identity_convs = _CallCounter(monkeypatch, "through_identity_conv")
  out = {}
  for name, (fn, args, _) in aot.build_programs(config, mesh, platform=platform).items():
    barriers.count = identity_convs.count = 0
    counts = _primitives(fn.trace(*args).jaxpr.jaxpr)
    out[name] = (counts, barriers.count, identity_convs.count)
  return out


def test_the_programs_devices_decide_the_platform_code(monkeypatch):
  # The same production steps traced on this CPU host: for its CPU devices,
  # and for TPU / CUDA devices. Only the CPU programs carry the fusion
  # barriers (while loops) and the identity convolutions.
  config = _config()
  mesh = parallel.make_mesh(jax.devices()[:1])
  cpu = _traced_counts(config, mesh, None, monkeypatch)
  predict_counts, predict_barriers, predict_convs = cpu["predict_step"]
  # Inference: one while loop per barrier applied, nothing else loops.
  assert predict_barriers > 0 and predict_counts["while"] == predict_barriers
  assert cpu["train_step"][0]["while"] > 0
  for platform in ("tpu", "gpu"):
    other = _traced_counts(config, mesh, platform, monkeypatch)
    for name, (counts, barriers, convs) in other.items():
      assert barriers == 0 and convs == 0 and counts["while"] == 0, (platform, name)
      cpu_counts, _, cpu_convs = cpu[name]
      if name == "predict_step":  # forward only: each identity conv is one op
        assert cpu_counts["conv_general_dilated"] - counts["conv_general_dilated"] == cpu_convs
      assert cpu_counts["dot_general"] == counts["dot_general"]


def test_cpu_options_only_in_cpu_programs(monkeypatch):
  seen = []
  real_jit = jax.jit
  monkeypatch.setattr(compiler_options.jax, "jit",
                      lambda fun, **kw: seen.append(kw.get("compiler_options")) or real_jit(fun, **kw))
  config = _config()
  mesh = parallel.make_mesh(jax.devices()[:1])
  aot.build_programs(config, mesh)
  assert seen == [compiler_options.CPU_OPTIONS] * 2
  seen.clear()
  aot.build_programs(config, mesh, platform="tpu")
  assert seen == [None, None]
  with pytest.raises(ValueError, match="unknown platform"):
    compiler_options.canonical("metal")
  assert compiler_options.canonical("cuda") == "gpu"


def test_precision_policy_reaches_the_lowered_program():
  mesh = parallel.make_mesh(jax.devices()[:1])
  for fast in (False, True):
    for name, (fn, args, _) in aot.build_programs(_config(fast), mesh, platform="gpu").items():
      text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
      highest = len(re.findall(r"precision = \[HIGHEST, HIGHEST\]", text))
      convs = [re.search(r"\(tensor<(?:\d+x)*([a-z]+\d+)>", l[l.rindex(" : ("):]).group(1)
               for l in text.splitlines() if "stablehlo.convolution" in l]
      assert convs, name
      if fast:
        assert highest == 0, name
        assert set(convs) == {"bf16"}, (name, collections.Counter(convs))
      else:  # the parity setting: every lifter dot at HIGHEST, float32 convolutions
        assert highest > 10, name
        assert set(convs) == {"f32"}, (name, collections.Counter(convs))


def test_cost_and_roofline_match_closed_forms():
  # XLA's cost analysis as aot reads it: a matmul's FLOPs are 2mnk; the
  # estimate is the binding one of the compute and memory bounds.
  m, n, k = 64, 48, 32
  compiled = jax.jit(jnp.matmul).lower(jnp.zeros((m, k)), jnp.zeros((k, n))).compile()
  cost = aot._cost(compiled)  # pylint: disable=protected-access
  assert cost["flops"] == 2 * m * n * k
  assert cost["bytes accessed"] >= 4 * (m * k + k * n + m * n)
  chip = aot.Chip("test", 1 << 30, peak_flops=1e12, hbm_bandwidth=1e9)
  target = aot.Target("t", "tpu", [], chip, num_devices=4, num_hosts=1)
  for flops, nbytes, bound in ((1e9, 1e3, "compute"), (1e3, 1e9, "memory")):
    report = aot.ProgramReport("p", 32, 0.0, flops, nbytes, 0, 0, 0, 0, None)
    est = aot.estimate(report, target, 0.5)
    seconds = max(flops / 0.5e12, nbytes / 0.5e9)
    assert (est.step_seconds, est.bound) == (pytest.approx(seconds), bound)
    assert est.examples_per_second == pytest.approx(32 / seconds)
    assert est.epoch_seconds == pytest.approx(aot.H36M_TRAIN_FRAMES * seconds / 32)


def test_topology_names():
  resolve = aot._topology  # pylint: disable=protected-access
  assert resolve("v5e-8") == ("v5e:2x4", (2, 4), {"chips_per_host_bounds": (2, 4, 1)})
  assert resolve("v5e:4x8")[2] == {"chips_per_host_bounds": (2, 2, 1)}
  assert resolve("v5p-8") == ("v5:2x2x1", (2, 2, 1), {"chip_config_name": "megacore",
                                                    "chips_per_host_bounds": (2, 2, 1)})
  assert resolve("v5p:2x2x2")[0] == "v5:2x2x2"
  for bad in ("v9-8", "v5e:2x2x2", "v4:2x2", "tpu"):
    with pytest.raises(aot.TargetError, match=r"^--topology="):
      resolve(bad)


@pytest.fixture(scope="module")
def tpu_run(tmp_path_factory):
  """One real TPU compilation: capf-compile of the fast setting on a v5e-8,
  with --json and --hlo (its stdout, stderr and HLO directory)."""
  hlo = tmp_path_factory.mktemp("hlo")
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(
      [sys.executable, "-m", "contextpose_jax.compile", "--config=configs/tiny_test.py",
       "--topology=v5e:2x4", *FAST, "--json", f"--hlo={hlo}"],
      capture_output=True, text=True, timeout=900,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return proc, hlo


def test_tpu_compilation_of_the_production_steps(tpu_run):
  proc, hlo = tpu_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  # libtpu's start-up chatter (no TPU attached) stays off the console.
  assert proc.stderr.strip() == "", proc.stderr[-2000:]
  data = json.loads(proc.stdout)
  assert (data["target"], data["platform"], data["compiled"]) == ("v5e:2x4", "tpu", True)
  assert (data["devices"], data["hosts"], data["chip"]["name"]) == (8, 1, "TPU v5e")
  config = _config(fast=True)
  for name, batch in (("train_step", config.data.batch_size),
                      ("predict_step", config.data.eval_batch_size)):
    p = data["programs"][name]
    assert p["global_batch"] == batch and p["fits"] is True
    # Each device holds at least its share of the batch images (bf16 or f32
    # after the compiler's layout padding: at least the float32 bytes / 2).
    images = math.prod((batch // 8, 256, 192, 3)) * 4
    assert p["argument_bytes"] >= images // 2 * (2 if name == "predict_step" else 1)
    assert p["peak_bytes"] == (p["argument_bytes"] + p["output_bytes"] + p["temp_bytes"]
                               - p["alias_bytes"])
    assert p["flops_per_device"] > 0
    est = p["estimate"]
    chip = data["chip"]
    expected = max(p["flops_per_device"] / (0.5 * chip["peak_flops"]),
                   p["bytes_accessed_per_device"] / (0.5 * chip["hbm_bandwidth"]))
    assert est["step_seconds"] == pytest.approx(expected)
    assert est["examples_per_second"] == pytest.approx(batch / expected)
    text = (hlo / f"{name}.hlo.txt").read_text()
    # The fast setting: no HIGHEST dot anywhere, the backbone's convolutions in bf16.
    assert "highest" not in text
    backbone = [l for l in text.splitlines() if re.search(r"\bconvolution\(", l)
                and "/backbone/" in l]
    assert backbone and all(re.search(r"= bf16\[", l) for l in backbone), name


def test_tpu_flops_match_the_unoptimized_program(tpu_run):
  # The compiled TPU program's FLOPs per device against an independent count:
  # the cost analysis of the program as JAX emitted it (before XLA's passes),
  # for one device's share of the batch.
  data = json.loads(tpu_run[0].stdout)
  mesh = parallel.make_mesh(jax.devices()[:1])
  config = _config(fast=True)
  config.batch_size = config.data.batch_size = config.data.batch_size // 8
  config.data.eval_batch_size //= 8
  for name, (fn, args, _) in aot.build_programs(config, mesh, platform="tpu").items():
    unoptimized = fn.trace(*args).lower(lowering_platforms=("tpu",)).cost_analysis()
    compiled = data["programs"][name]["flops_per_device"]
    assert 0.5 < compiled / unoptimized["flops"] < 2.0, (name, compiled, unoptimized["flops"])


def test_a_program_that_does_not_fit_is_one_line(tpu_run, monkeypatch, capsys):
  data = json.loads(tpu_run[0].stdout)
  small = dataclasses.replace(aot.CHIPS["TPU v5 lite"], hbm_bytes=1 << 20)
  monkeypatch.setitem(aot.CHIPS, "TPU v5 lite", small)
  reports = [aot.ProgramReport(name, p["global_batch"], p["compile_seconds"],
                               p["flops_per_device"], p["bytes_accessed_per_device"],
                               p["argument_bytes"], p["output_bytes"], p["temp_bytes"],
                               p["alias_bytes"], p["compiler_optimal_seconds"])
             for name, p in data["programs"].items()]
  monkeypatch.setattr(aot, "compile_programs", lambda *a, **k: reports)
  code = compile_cli.main(["--config=configs/tiny_test.py", "--topology=v5e-8"])
  out, err = capsys.readouterr()
  assert code == 1
  lines = err.strip().splitlines()
  train = data["programs"]["train_step"]
  assert lines[0] == (f"error: v5e-8: the train step needs {train['peak_bytes'] / 2**30:.2f} "
                      "GiB per device at global batch 16; a TPU v5e has 0.0 GiB")
  assert len(lines) == 2 and lines[1].startswith("error: v5e-8: the predict step needs "), err
  assert "NO" in out  # the table still shows which program failed


def test_multi_host_slices():
  target = aot.resolve_target("v5e-32")
  assert (target.num_devices, target.num_hosts, target.chip.name) == (32, 8, "TPU v5e")
  target = aot.resolve_target("v5p-8")
  assert (target.num_devices, target.num_hosts, target.chip.name) == (4, 1, "TPU v5p")
  assert target.chip.hbm_bytes == 95 * 2**30


@pytest.mark.skipif(aot._cuda_plugin_installed(), reason="a CUDA plugin compiles instead")  # pylint: disable=protected-access
def test_cuda_without_a_plugin_is_lowered_and_says_so(capsys):
  code = compile_cli.main(["--config=configs/tiny_test.py", "--platform=cuda",
                           "--num_devices=2"])
  out, err = capsys.readouterr()
  assert code == 0, err
  assert "lowered only (no CUDA plugin" in out and "2x H100" in out
  assert "before fusion" in out and "roofline" not in out  # unfused bytes: no step time
  config = _config()
  report = aot.compile_programs(config, aot.resolve_target(platform="cuda", num_devices=2))
  train = report[0]
  # One GPU's arguments: the replicated train state plus half the batch.
  state_bytes = sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves(
      aot.build_programs(config, parallel.make_mesh(jax.devices()[:1]))["train_step"][1][0]))
  batch_bytes = sum(math.prod(shape) * jnp.dtype(dtype).itemsize for shape, dtype in
                    aot.batch_specs(config.data.batch_size, train=True,
                                    flip_test=True).values())
  assert train.argument_bytes == state_bytes + batch_bytes // 2
  assert train.flops > 0 and train.temp_bytes is None
  assert aot.estimate(train, aot.resolve_target(platform="cuda", num_devices=2), 0.5) is None


def test_bad_targets_are_one_line(capsys):
  for argv, message in (
      (["--topology=v9-8"], "error: --topology=v9-8: expected a slice"),
      (["--topology=v5e-8", "--platform=cuda"], "error: give one of --topology"),
      (["--platform=rocm"], "error: --platform=rocm: only 'cuda'"),
      (["--topology=v5e-8", "--config.data.batch_size=12"],
       "error: config.data.batch_size=12 is not divisible by the 8 devices")):
    code = compile_cli.main(["--config=configs/tiny_test.py", *argv])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(message) and len(err.strip().splitlines()) == 1, err
  assert compile_cli.main(["--topology=v5e-8"]) == 2
  assert "--config is required" in capsys.readouterr().err
