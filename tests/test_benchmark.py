"""The benchmark's machinery at tiny sizes (nothing here is timed).

What a benchmark row claims is only worth something if the rows it compares do
the same work: every JAX row must compute what the torch row computes on the
same inputs (the production Predictor folded and unfolded, the production
train step, the lifter-only AdamW step, the three context samplers), the
compile rows must run, and the timing / ratio / target arithmetic must be right.
"""
import numpy as np
import pytest

from benchmarks import speed as benchmark

SMALL = benchmark.TINY_BACKBONES


def test_measure_median_excludes_first_call_and_warmup():
  # A fake clock: call k takes durations[k] seconds.
  durations = iter([50.0, 9.0, 9.0, 3.0, 1.0, 2.0, 100.0, 4.0])
  now = [0.0]
  calls = []

  def fn():
    calls.append(1)
    now[0] += next(durations)
  timing = benchmark.measure(fn, warmup=2, repeats=5, clock=lambda: now[0])
  assert len(calls) == 8
  assert timing.first_s == 50.0
  assert timing.times == [3.0, 1.0, 2.0, 100.0, 4.0]
  assert timing.median_s == 3.0


def test_measure_interleaved_rounds():
  """Every row sees each round's load: calls alternate a, b, a, b, ..."""
  now, order = [0.0], []

  def make(name, seconds):
    def fn():
      order.append(name)
      now[0] += seconds
    return fn
  timings = benchmark.measure_interleaved({"a": make("a", 1.0), "b": make("b", 3.0)},
                                          warmup=1, repeats=3, clock=lambda: now[0])
  assert order == ["a", "b"] * 5
  assert timings["a"].times == [1.0] * 3 and timings["b"].median_s == 3.0


def test_ratios_and_table():
  t = lambda s: benchmark.Timing(first_s=10.0, median_s=s, times=[s])
  rows = [benchmark.Row("g", "jax fp32", 8, timing=t(0.5), max_diff=2e-6),
          benchmark.Row("g", "torch fp32", 8, timing=t(1.0), reference=True),
          benchmark.Row("p", "grain", 256, "examples/s", rate=1000.0)]
  assert [r.throughput for r in rows] == [16.0, 8.0, 1000.0]
  assert benchmark.ratios(rows) == [2.0, 1.0, None]
  table = benchmark.format_table(rows).splitlines()
  assert table[2] == ("| g | jax fp32 | 16.0 images/s | 2.00x | 500.0 ms | 500.0 ms | 10.0 s "
                      "| 2.0e-06 |")
  assert table[3].startswith("| g | torch fp32 | 8.0 images/s | 1.00 (reference) |")
  assert table[4] == "| p | grain | 1,000.0 examples/s | - | - | - | - | - |"


@pytest.mark.parametrize("backbone", ["hrnet_32", "cpn"])
def test_full_model_rows_compute_the_same_as_torch(backbone):
  models = benchmark.build_models(backbone, backbone_kwargs=SMALL[backbone], embed_dim=32,
                                  depth=1, seed=3)
  # bf16 on one backbone only: each JAX row is one more compilation.
  dtypes = ("float32", "bfloat16") if backbone == "hrnet_32" else ("float32",)
  work = benchmark.full_model_workload(backbone, 2, dtypes=dtypes, models=models, seed=3)
  assert set(work.impls) == {"jax fp32", "jax fp32 unfolded", "torch fp32"} | (
      {"jax bf16"} if backbone == "hrnet_32" else set())
  # The JAX rows are the production Predictor, folded by default.
  assert work.impls["jax fp32"].func.__self__.fold_pairs
  assert not work.impls["jax fp32 unfolded"].func.__self__.fold_pairs
  rows = {r.impl: r for r in benchmark.run_workload(work, warmup=0, repeats=1)}
  assert rows["torch fp32"].reference
  assert all(r.kind == "model" and r.backbone == backbone for r in rows.values())
  # Every row is measured against torch in float64 (the exact answer).
  want = work.exact()
  assert want.dtype == np.float64 and np.abs(want).max() > 0.05  # a non-degenerate pose
  for name in ("torch fp32", "jax fp32", "jax fp32 unfolded"):
    assert rows[name].max_diff < 2e-4, (name, rows[name].max_diff)
    np.testing.assert_allclose(work.outputs[name], want, rtol=1e-4, atol=2e-4)
  # bf16 backbone: not equal, but the same pose up to bf16 rounding (which a
  # random, untrained backbone amplifies more than a trained one).
  if backbone == "hrnet_32":
    got = work.outputs["jax bf16"]
    assert rows["jax bf16"].max_diff > 1e-3
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95


def test_production_train_step_matches_torch_adamw():
  """The production step (steps.make_train_step, BatchNorm folded in it) and
  the torch step, drop path and dropout off, one step each from the same
  weights and batch: the same loss and the same AdamW-updated lifter."""
  models = benchmark.build_models("hrnet_32", backbone_kwargs=SMALL["hrnet_32"],
                                  embed_dim=32, depth=1, seed=2)
  assert models[2].drop_rate == 0.0 and models[2].attn_drop_rate == 0.0  # no dropout
  work = benchmark.train_step_workload("hrnet_32", 3, models=models, drop_path_rate=0.0,
                                       seed=2)
  assert work.comparable and work.kind == "train_step"
  rows = {r.impl: r for r in benchmark.run_workload(work, warmup=0, repeats=1)}
  got, want = work.outputs["jax fp32"], work.outputs["torch fp32"]
  assert float(want[0]) > 0.1  # a real loss
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  _assert_same_first_adamw_step(work, got, want)
  assert rows["jax fp32"].max_diff < 2 * 6.4e-4
  # The official drop path (0.2): different masks in the two frameworks.
  assert not benchmark.train_step_workload("hrnet_32", 3, models=models).comparable


def test_compile_rows_report_cold_and_warm_first_calls(tmp_path):
  rows = benchmark.first_call_rows("hrnet_32", 1, cache_dir=str(tmp_path / "cache"),
                                   backbone_kwargs=SMALL["hrnet_32"], embed_dim=32, depth=1)
  assert [r.impl for r in rows] == ["jax fp32, cold cache",
                                    "jax fp32, warm cache (2nd process)"]
  for row in rows:
    assert row.kind == "compile" and row.timing.first_s > 0 and row.timing.median_s > 0
  assert "first call" in benchmark.format_targets(rows)


def test_lifter_train_step_matches_torch_adamw():
  """One step each from the same weights and batch (drop path off, so both are
  deterministic): the same loss and the same AdamW-updated weights."""
  work = benchmark.lifter_train_workload("hrnet_32", 3, embed_dim=32, depth=1,
                                         drop_path_rate=0.0,
                                         backbone_kwargs=SMALL["hrnet_32"], seed=1)
  rows = benchmark.run_workload(work, warmup=0, repeats=1)
  jax_row = next(r for r in rows if r.impl == "jax fp32")
  assert jax_row.max_diff is not None and jax_row.max_diff < 2 * 6.4e-4  # a bounded step
  got, want = work.outputs["jax fp32"], work.outputs["torch fp32"]
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)  # the loss
  _assert_same_first_adamw_step(work, got, want)
  # With drop path on (the official 0.2), the random masks differ: no claim.
  assert not benchmark.lifter_train_workload(
      "hrnet_32", 3, embed_dim=32, depth=1, backbone_kwargs=SMALL["hrnet_32"]).comparable


@pytest.mark.parametrize("stack", ["per-joint", "across-joint"])
def test_block_rows_agree_with_torch(stack):
  # One lifter block forward + backward: the input and weight gradients of
  # ours and of the torch reference block, from the same weights.
  work = benchmark.lifter_block_workload(stack, 2, embed_dim=16, num_heads=4)
  rows = {r.impl: r for r in benchmark.run_workload(work, warmup=0, repeats=1)}
  assert rows["torch fp32"].reference and rows["torch fp32"].kind == "block"
  want = work.outputs["torch fp32"]
  assert want[0].shape == benchmark.BLOCK_STACKS[stack](2, 5, 16)
  assert len(want) == 13  # the input + 12 weight gradients (2 LayerNorms, 4 linears)
  for got, ref in zip(work.outputs["jax fp32"], want):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("backward", [False, True])
def test_three_samplers_agree(backward):
  work = benchmark.sampler_workload("hrnet_32", 2, backward=backward, points_per_joint=4,
                                    backbone_kwargs=SMALL["hrnet_32"], seed=backward)
  rows = {r.impl: r for r in benchmark.run_workload(work, warmup=0, repeats=1)}
  assert rows["torch grid_sample"].reference
  for name in ("jax gather (ours)", "jax map_coordinates"):
    assert rows[name].max_diff < 1e-4, (name, rows[name].max_diff)
  out = work.compare(work.impls["torch grid_sample"]())
  assert len(out) == (5 if backward else 4)  # 4 maps (+ the points' gradient)
  assert all(np.abs(o).max() > 0.1 for o in out)


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_conv_rows_agree_with_the_exact_convolution(dtype, tolerance):
  # The Eigen (ours) and YNNPACK programs and torch compute the same
  # convolution (torch only in float32); every row is measured against float64.
  work = benchmark.conv_workload((12, 8, 16), 8, 3, 2, batch=2, dtype=dtype)
  rows = {r.impl: r for r in benchmark.run_workload(work, warmup=0, repeats=1)}
  assert set(rows) == ({"jax eigen (ours)", "jax ynnpack (XLA default)"}
                       | ({"torch"} if dtype == "float32" else set()))
  for row in rows.values():
    assert row.max_diff < tolerance, (row.impl, row.max_diff)
  assert np.abs(work.exact()).max() > 0.5


def test_parse_args_quick_tiny_and_errors():
  args = benchmark.parse_args(["--quick", "--rows=model,train"])
  assert args.backbones == ["hrnet_32"] and args.batch_sizes == [2]
  assert args.rows == ["model", "train"] and args.repeats == 3
  assert args.train_step_backbones == ["hrnet_32"]
  args = benchmark.parse_args(["--tiny"])
  assert args.rows == ["model", "train_step", "train", "sampler", "compile"]
  assert args.model_kwargs == {"embed_dim": 32, "depth": 1}
  args = benchmark.parse_args(["--train_step_backbones=cpn"])
  assert args.train_step_backbones == ["cpn"] and len(args.backbones) == 3
  for bad in (["--rows=model,nope"], ["--rows=model,fold"], ["--quick", "--tiny"],
              ["--train_step_backbones=resnet"]):
    with pytest.raises(SystemExit):
      benchmark.parse_args(bad)


def test_targets_marked_from_the_ratios():
  t = lambda s: benchmark.Timing(first_s=1.0, median_s=s, times=[s, 2 * s])
  row = lambda group, impl, items, s, kind, backbone, ref=False: benchmark.Row(
      group, impl, items, timing=t(s), reference=ref, kind=kind, backbone=backbone)
  rows = [row("m32", "jax fp32", 8, 1.0, "model", "hrnet_32"),
          row("m32", "torch fp32", 8, 1.2, "model", "hrnet_32", True),
          row("m48", "jax fp32", 8, 1.5, "model", "hrnet_48"),
          row("m48", "torch fp32", 8, 1.2, "model", "hrnet_48", True),
          row("t", "jax fp32", 64, 1.0, "train", "hrnet_32"),
          row("t", "torch fp32", 64, 1.4, "train", "hrnet_32", True),
          row("s", "jax gather (ours)", 16, 1.0, "sampler fwd", "hrnet_32"),
          row("s", "torch grid_sample", 16, 3.0, "sampler fwd", "hrnet_32", True),
          benchmark.Row("c", "jax fp32, cold cache", 1, timing=t(0.1), kind="compile",
                        backbone="hrnet_32")]
  lines = benchmark.format_targets(rows).splitlines()
  find = lambda *words: [l for l in lines if all(w in l for w in words)]
  assert find("full model", "hrnet_32", "1.20x", "met")
  assert find("full model", "hrnet_48", "0.80x", "NOT met")
  assert find("full model", "cpn", "not measured")  # every backbone is required
  assert find("production train step", "not measured")
  assert find("lifter-only", "1.40x", "NOT met")
  assert find("sampler fwd,", "3.00x", "not judged (batch 16, target at 64)")
  assert find("sampler fwd+bwd", "not measured")
  assert find("compilation", "first call 1.0 s")


def _assert_same_first_adamw_step(work, got, want):
  """JAX's and torch's updated weights after one AdamW step agree.

  Adam's first step is lr * g / (|g| + 1e-8): where a gradient is itself
  ~1e-8 (rounding level), the step is rounding noise in both frameworks; all
  other weights agree to float32 precision. The comparison covers every
  weight, and the step moved each by about lr (lr 6.4e-4, as
  configs/h36m_hrnet32.py), far more than the tolerance.
  """
  diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(got[1:], want[1:])])
  assert (diff > 2e-5).mean() < 1e-4, ((diff > 2e-5).sum(), diff.size)
  before = benchmark.comparable_weights(work.extras["initial_params"])
  for name in ("jax fp32", "torch fp32"):
    after = work.outputs[name][1:]
    assert len(after) == len(before) > 20
    moved = np.array([np.abs(a - b).max() for a, b in zip(after, before)])
    assert moved.min() > 1e-4 and moved.max() < 2e-3, (name, moved.min(), moved.max())
