r"""JAX vs the PyTorch reference, side by side, on this machine (issue #9).

    python -m benchmarks.speed                   # everything
    python -m benchmarks.speed --tiny            # smoke test of every row (~2 min)
    python -m benchmarks.speed --rows=model,train_step --backbones=hrnet_32 \
        --batch_sizes=1,8 --json=bench.json

Rows (``--rows``), each timed after its first call and warm-up as the median
(and best) of ``--repeats`` calls, with device synchronisation; the
implementations of a row group are timed interleaved (a round calls each once):
  model       full model inference (backbone + lifter) per backbone and batch
              size through the production path, ``api.Predictor.predict``:
              BatchNorm folded at load time (its default) in fp32 and with a
              bf16 backbone (``--dtypes``), fp32 unfolded
              (``fold_batch_norm=False``, ``--unfolded``), vs torch fp32
              (``torch_reference.capf.CAPF`` under ``no_grad``), same weights;
  train_step  ONE training step as ``main.py`` runs it: ``steps.make_train_step``
              (frozen backbone, BatchNorm folded in the step) +
              ``create_train_state`` + ``make_optimizer`` / ``learning_rate_fn``
              of the backbone's config + ``parallel.make_mesh`` /
              ``global_batch``, vs torch (backbone eval under no_grad, lifter
              train mode, MPJPE, backward, AdamW), batch ``--train_step_batch``;
  train       one lifter-only train step, features precomputed: jitted
              value_and_grad + optax AdamW vs torch backward + AdamW;
  blocks      forward + backward of one per-joint and one across-joint
              transformer block of that step's lifter, batch ``--train_batch``
              (where the train row's time goes);
  sampler     the context sampler alone: our ``grid_sample`` (custom VJP) vs
              ``jax.scipy.ndimage.map_coordinates`` vs torch ``F.grid_sample``,
              forward and forward + backward;
  conv        single convolutions of the backbones' shapes (NHWC, fp32 and
              bf16): XLA:CPU's Eigen path (ours, ``compiler_options``) vs its
              default YNNPACK path vs torch ``F.conv2d``;
  compile     the first ``Predictor.predict`` call of the full-size model
              (``--compile_backbone``, ``--compile_batch``) in a new process
              with an empty persistent compilation cache (cold) and in a second
              process reusing it (warm);
  pipeline    the training input pipeline, examples/s
              (``benchmarks.data_throughput``; no PyTorch counterpart).
Rows with a PyTorch counterpart also report the largest difference of their
outputs on the same inputs (full model: from torch in float64, which torch's
fp32 row is measured against too; others: from the torch row; train rows with
drop path on: none, the frameworks draw different masks). The output ends with
issue #9's targets marked met / not met. Weights are random (official layouts,
BatchNorm statistics calibrated): speed does not depend on their values.
``--host_malloc`` (default off: the reference runs as the official code does)
sets ``contextpose_jax.host_memory`` for the whole process, both frameworks.
Results and the command of the reference run: docs/benchmarks.md.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags
import numpy as np

from contextpose_jax import cli
from contextpose_jax import compile_cache
from contextpose_jax import host_devices
from contextpose_jax import host_memory
from contextpose_jax import paths
from contextpose_jax.models import BACKBONES

ALL_ROWS = ("model", "train_step", "train", "blocks", "sampler", "conv", "compile",
            "pipeline")


# ----------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
  first_s: float          # the first call: compilation (JAX) + one run
  median_s: float         # median of the timed calls, after warm-up
  times: list[float]


def measure_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 1,
                        repeats: int = 5, clock: Callable[[], float] = time.perf_counter
                        ) -> dict[str, Timing]:
  """Times several calls (each must block until its result is ready) in turn.

  Each call is made once (compilation: the "first call"), then ``warmup``
  rounds, then ``repeats`` timed rounds; a round calls every function once,
  so a change of machine load during the run hits every row alike (this
  matters on a shared machine) instead of whichever row ran then.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  first, times = {}, {name: [] for name in fns}
  for name, fn in fns.items():
    start = clock()
    fn()
    first[name] = clock() - start
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  for _ in range(repeats):
    for name, fn in fns.items():
      start = clock()
      fn()
      times[name].append(clock() - start)
  return {name: Timing(first[name], float(np.median(times[name])), times[name])
          for name in fns}


def measure(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5,
            clock: Callable[[], float] = time.perf_counter) -> Timing:
  """``measure_interleaved`` of a single call."""
  return measure_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, clock=clock)["fn"]


def _jax_blocking(fn):
  import jax  # pylint: disable=g-import-not-at-top
  return lambda *a: jax.block_until_ready(fn(*a))


def _torch_sync():
  import torch  # pylint: disable=g-import-not-at-top
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _torch_device():
  import torch  # pylint: disable=g-import-not-at-top
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------
# Rows and the table.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  group: str                   # the work, e.g. "full model hrnet_32, batch 8"
  impl: str                    # "jax fp32", "torch fp32", ...
  items: int                   # examples per call
  unit: str = "images/s"
  timing: Timing | None = None
  rate: float | None = None    # for rows measured as a rate (pipeline)
  max_diff: float | None = None  # max |output - torch output|
  reference: bool = False      # the torch row of its group
  kind: str = ""               # "model", "train_step", "train", "sampler fwd", ...
  backbone: str = ""

  @property
  def throughput(self) -> float:
    if self.rate is not None:
      return self.rate
    return self.items / self.timing.median_s

  def as_dict(self) -> dict:
    d = {"group": self.group, "impl": self.impl, "items": self.items, "unit": self.unit,
         "kind": self.kind, "backbone": self.backbone,
         "throughput": self.throughput, "max_diff": self.max_diff,
         "reference": self.reference}
    if self.timing is not None:
      d.update(median_s=self.timing.median_s, best_s=min(self.timing.times),
               first_call_s=self.timing.first_s, times_s=self.timing.times)
    return d


def ratios(rows: Sequence[Row]) -> list[float | None]:
  """Each row's throughput over its group's torch row (None where there is none)."""
  reference = {r.group: r.throughput for r in rows if r.reference}
  return [r.throughput / reference[r.group] if r.group in reference else None
          for r in rows]


def format_table(rows: Sequence[Row]) -> str:
  """A markdown table: throughput (from the median call), ratio JAX/PyTorch,
  median / best / first call, and the largest output difference (full model:
  from torch in float64; other rows: from the torch row)."""
  lines = ["| work | implementation | throughput | JAX / PyTorch | median call | "
           "best call | first call | max abs diff |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for row, ratio in zip(rows, ratios(rows)):
    t = row.timing
    lines.append("| " + " | ".join([
        row.group, row.impl, f"{row.throughput:,.1f} {row.unit}",
        "1.00 (reference)" if row.reference else (f"{ratio:.2f}x" if ratio else "-"),
        f"{t.median_s * 1e3:,.1f} ms" if t else "-",
        f"{min(t.times) * 1e3:,.1f} ms" if t else "-",
        f"{t.first_s:,.1f} s" if t else "-",
        f"{row.max_diff:.1e}" if row.max_diff is not None else "-"]) + " |")
  return "\n".join(lines)


# Issue #9's targets: (kind, the JAX row, batch, backbones that must all be
# measured (empty: whichever were), minimum JAX / PyTorch, description).
TARGETS = (
    ("model", "jax fp32", 8, BACKBONES, 1.0, "full model fp32, batch 8, every backbone"),
    ("train_step", "jax fp32", 64, (), 1.0, "production train step, batch 64"),
    ("train", "jax fp32", 64, (), 1.5, "lifter-only train step, batch 64"),
    ("sampler fwd", "jax gather (ours)", 64, (), 2.0, "context sampler fwd, batch 64"),
    ("sampler fwd+bwd", "jax gather (ours)", 64, (), 2.0,
     "context sampler fwd+bwd, batch 64"),
)


def _best_ratio(row: Row, reference: Row) -> float | None:
  if row.timing is None or reference.timing is None:
    return None
  return (min(reference.timing.times) / reference.items) / (min(row.timing.times) / row.items)


def format_targets(rows: Sequence[Row]) -> str:
  """Each #9 target marked met / NOT met from the measured median ratio (the
  best-call ratio beside it); rows measured at another batch size are shown
  but not judged."""
  lines = ["| target | backbone | JAX / PyTorch (median) | (best call) | met? |",
           "|---|---|---:|---:|---|"]
  for kind, impl, batch, required, minimum, text in TARGETS:
    candidates = [r for r in rows if r.kind == kind and r.impl == impl]
    backbones = list(required) + [b for b in dict.fromkeys(r.backbone for r in candidates)
                                  if b not in required]
    if not backbones:
      lines.append(f"| {text}: >= {minimum:g}x | - | - | - | not measured |")
    for backbone in backbones:
      mine = [r for r in candidates if r.backbone == backbone]
      if not mine:
        lines.append(f"| {text}: >= {minimum:g}x | {backbone} | - | - | not measured |")
        continue
      at_batch = [r for r in mine if r.items == batch]
      for row in at_batch or mine:
        reference = next(r for r in rows if r.group == row.group and r.reference)
        ratio = row.throughput / reference.throughput
        best = _best_ratio(row, reference)
        verdict = (("met" if ratio >= minimum else "**NOT met**") if at_batch else
                   f"not judged (batch {row.items}, target at {batch})")
        lines.append(f"| {text}: >= {minimum:g}x | {backbone} | {ratio:.2f}x | "
                     f"{best:.2f}x | {verdict} |")
  compile_rows = [r for r in rows if r.kind == "compile"]
  for row in compile_rows:
    lines.append(f"| compilation: first call reported | {row.backbone} ({row.impl}) | "
                 f"first call {row.timing.first_s:,.1f} s | - | reported |")
  if not compile_rows:
    lines.append("| compilation: first call reported | - | - | - | not measured |")
  return "\n".join(lines)


def _max_diff(a, b) -> float:
  a = [np.asarray(x, np.float64) for x in (a if isinstance(a, (list, tuple)) else [a])]
  b = [np.asarray(x, np.float64) for x in (b if isinstance(b, (list, tuple)) else [b])]
  return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


# ----------------------------------------------------------------------------
# Workloads: every implementation of one piece of work, as no-argument calls.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
  group: str
  items: int
  unit: str
  impls: dict[str, Callable[[], Any]]     # name -> blocking call returning outputs
  reference: str | None = None            # the torch impl's name
  compare: Callable[[Any], Any] = lambda out: _to_numpy(out)  # -> arrays to compare
  comparable: bool = True                 # False: random (drop path) differs by design
  extras: dict = dataclasses.field(default_factory=dict)
  # Optional: the exact answer (arrays like ``compare``'s) to measure every row against.
  exact: Callable[[], Any] | None = None
  # Filled by run_workload: each impl's compared outputs of its first call.
  outputs: dict = dataclasses.field(default_factory=dict)
  # What the issue #9 targets look up (``TARGETS``): the kind of work and its backbone.
  kind: str = ""
  backbone: str = ""


def _random_inputs(batch: int, seed: int):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, 256, 192, 3)).astype(np.float32)
  kp2d = rng.uniform(-0.6, 0.6, (batch, 17, 2)).astype(np.float32)
  crop = (rng.uniform(0.05, 0.95, (batch, 17, 2)) * [191, 255]).astype(np.float32)
  return images, kp2d, crop


def build_models(backbone: str, *, backbone_kwargs=None, embed_dim: int | None = None,
                 depth: int = 4, seed: int = 0):
  """A random official-layout torch CA-PF (h36m) and the same weights in JAX.

  Returns ``(torch_model, jax_variables, model_config)``.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from contextpose_jax.models import capf  # pylint: disable=g-import-not-at-top
  from torch_reference import capf as ref_capf  # pylint: disable=g-import-not-at-top
  from torch_reference.common import state_dict_numpy
  config = capf.default_model_config(backbone, "h36m")
  if backbone_kwargs:
    config.backbone_kwargs = ml_collections.ConfigDict(dict(backbone_kwargs))
  if embed_dim:
    config.embed_dim = embed_dim
  config.depth = depth
  model = ref_capf.random_capf(backbone, "h36m", seed, backbone_kwargs=backbone_kwargs,
                               embed_dim=config.embed_dim, depth=depth)
  variables = capf.load_torch_state_dict(state_dict_numpy(model), capf.build_model(config),
                                         config, source=f"random {backbone}")
  return model, variables, config


def full_model_workload(backbone: str, batch: int, *, dtypes=("float32", "bfloat16"),
                        unfolded: bool = True, models=None, seed: int = 0,
                        **model_kwargs) -> Workload:
  """Backbone + lifter inference on ``batch`` crops: JAX rows and the torch row.

  The JAX rows are the production inference path, ``api.Predictor.predict``
  (numpy in, numpy out): BatchNorm folded at load time (its default) for each
  of ``dtypes``, plus fp32 with ``fold_batch_norm=False`` when ``unfolded``.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from contextpose_jax.api import Predictor  # pylint: disable=g-import-not-at-top
  from contextpose_jax.models import capf  # pylint: disable=g-import-not-at-top
  torch_model, variables, config = models or build_models(backbone, seed=seed, **model_kwargs)
  images, kp2d, crop = _random_inputs(batch, seed + 7)
  impls = {}
  variants = [(dtype, True) for dtype in dtypes]
  if unfolded and "float32" in dtypes:
    variants.append(("float32", False))
  for dtype, fold in variants:
    cfg = config.copy_and_resolve_references()
    cfg.backbone_dtype = dtype
    predictor = Predictor(capf.build_model(cfg), variables, cfg, fold_batch_norm=fold)
    name = "jax " + {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)
    impls[name if fold else name + " unfolded"] = functools.partial(
        predictor.predict, images, kp2d, crop)

  device = _torch_device()
  torch_model = torch_model.to(device)
  t_args = [torch.tensor(a, device=device) for a in (images, kp2d, crop)]

  def torch_call():
    with torch.no_grad():
      out = torch_model(*t_args)
    _torch_sync()
    return out
  impls["torch fp32"] = torch_call

  def torch_float64():
    # A full-size float32 backbone rounds by ~1e-3 on maps of ~10, in torch as
    # much as in JAX, and the lifter amplifies it: every row is measured
    # against the float64 answer, torch's own float32 row included.
    model64 = copy.deepcopy(torch_model).double()
    with torch.no_grad():
      return model64(*[t.double() for t in t_args]).cpu().numpy()
  return Workload(f"full model {backbone}, batch {batch}", batch, "images/s", impls,
                  "torch fp32", _to_numpy, exact=torch_float64, kind="model",
                  backbone=backbone)


def _to_numpy(out):
  if hasattr(out, "detach"):
    return out.detach().cpu().numpy()
  if isinstance(out, (list, tuple)):
    return [_to_numpy(o) for o in out]
  return np.asarray(out)


def feature_shapes(backbone: str, batch: int, backbone_kwargs=None):
  """NHWC shapes of the 4 backbone maps at 256x192."""
  from torch_reference import capf as ref_capf
  dims = ref_capf.feature_dims(backbone, backbone_kwargs)
  if backbone == "cpn":
    return [(batch, 64, 48, c) for c in dims]
  return [(batch, 64 // 2 ** i, 48 // 2 ** i, c) for i, c in enumerate(dims)]


def lifter_train_workload(backbone: str, batch: int, *, embed_dim: int = 128, depth: int = 4,
                          drop_path_rate: float = 0.2, lr: float = 6.4e-4,
                          weight_decay: float = 0.1, backbone_kwargs=None,
                          seed: int = 0) -> Workload:
  """One AdamW step of the lifter on precomputed (frozen-backbone) features.

  JAX: jitted value_and_grad of the MPJPE loss + ``optax.adamw`` (the update
  torch's AdamW makes: decoupled decay on the old weights), params and
  optimizer state donated. Torch: ``loss.backward()`` + ``AdamW.step()``.
  Both start from the same weights and see the same batch; each call of a
  row takes one more step. The outputs compared are the loss and the
  updated weights after the FIRST step of each (make the workload anew).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from contextpose_jax import compiler_options  # pylint: disable=g-import-not-at-top
  from contextpose_jax.models import torch_import  # pylint: disable=g-import-not-at-top
  from contextpose_jax.models.lifter import Lifter  # pylint: disable=g-import-not-at-top
  from torch_reference import capf as ref_capf
  from torch_reference.common import randomize_, state_dict_numpy
  from torch_reference.lifter import PoseTransformer

  torch.manual_seed(seed)
  dims = ref_capf.feature_dims(backbone, backbone_kwargs)
  torch_lifter = PoseTransformer(dims, embed_dim=embed_dim, depth=depth,
                                 drop_path_rate=drop_path_rate)
  randomize_(torch_lifter, seed)
  with torch.no_grad():
    for name, p in torch_lifter.named_parameters():
      if "sampling_offsets.weight" in name:
        p.mul_(0.25)
  lifter = Lifter(embed_dim=embed_dim, depth=depth, drop_path_rate=drop_path_rate)

  rng = np.random.default_rng(seed + 3)
  feats = [rng.normal(size=s).astype(np.float32)
           for s in feature_shapes(backbone, batch, backbone_kwargs)]
  kp2d = rng.uniform(-0.6, 0.6, (batch, 17, 2)).astype(np.float32)
  ref = rng.uniform(-0.9, 0.9, (batch, 17, 2)).astype(np.float32)
  target = rng.normal(0, 0.3, (batch, 17, 3)).astype(np.float32)
  target[:, 0] = 0

  target_shapes = jax.eval_shape(lifter.init, jax.random.PRNGKey(0), kp2d, ref, feats)
  params = torch_import.convert_state_dict(state_dict_numpy(torch_lifter), target_shapes,
                                           source="random lifter")["params"]
  tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)

  def loss_fn(p, feats, kp2d, ref, target, key):
    pred = lifter.apply({"params": p}, kp2d, ref, feats, train=True,
                        rngs={"dropout": key})
    return jnp.mean(jnp.linalg.norm(pred[:, 0] - target, axis=-1))

  @functools.partial(compiler_options.jit, donate_argnums=(0, 1))
  def step(p, opt_state, key, feats, kp2d, ref, target):
    key, sub = jax.random.split(key)
    loss, grads = jax.value_and_grad(loss_fn)(p, feats, kp2d, ref, target, sub)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, key, loss

  state = {"p": jax.device_put(params)}
  state["opt"] = tx.init(state["p"])
  state["key"] = jax.random.PRNGKey(seed)
  batch_args = [jax.device_put(x) for x in (feats, kp2d, ref, target)]

  def jax_call():
    state["p"], state["opt"], state["key"], loss = step(
        state["p"], state["opt"], state["key"], *batch_args)
    jax.block_until_ready(loss)
    return loss, state["p"]

  device = _torch_device()
  torch_lifter = torch_lifter.to(device).train()
  optimizer = torch.optim.AdamW(torch_lifter.parameters(), lr=lr, betas=(0.9, 0.999),
                                eps=1e-8, weight_decay=weight_decay)
  t_feats = [torch.tensor(f, device=device).permute(0, 3, 1, 2).contiguous() for f in feats]
  t_kp2d, t_ref, t_target = (torch.tensor(x, device=device) for x in (kp2d, ref, target))

  def torch_call():
    optimizer.zero_grad(set_to_none=True)
    pred = torch_lifter(t_kp2d, t_ref, t_feats)
    loss = torch.linalg.norm(pred[:, 0] - t_target, dim=-1).mean()
    loss.backward()
    optimizer.step()
    _torch_sync()
    return loss, torch_lifter

  def compare(out):
    loss, weights = out
    if hasattr(weights, "state_dict"):  # torch: the weights in the JAX layout
      weights = torch_import.convert_state_dict(
          state_dict_numpy(weights), target_shapes, source="torch lifter")["params"]
      loss = loss.detach().cpu()
    return [np.asarray(loss)] + comparable_weights(weights)

  # With drop path on, the two draw different random masks: nothing to compare.
  return Workload(f"lifter train step {backbone}, batch {batch}", batch, "examples/s",
                  {"jax fp32": jax_call, "torch fp32": torch_call}, "torch fp32", compare,
                  comparable=drop_path_rate == 0.0, extras={"initial_params": params},
                  kind="train", backbone=backbone)


# The lifter's two transformer stacks, as the lifter-only step runs them at
# batch B: tokens per row, width (5 levels x 128 channels).
BLOCK_STACKS = {"per-joint": lambda b, levels, c: (b * 17, levels, c),
                "across-joint": lambda b, levels, c: (b, 17, levels * c)}


def lifter_block_workload(stack: str, batch: int, *, embed_dim: int = 128, levels: int = 5,
                          num_heads: int = 8, seed: int = 0) -> Workload:
  """Forward + backward of ONE lifter transformer block (to its weights and
  its input), the shape the lifter-only step's ``stack`` blocks see at
  ``batch``: where the lifter-only row's time goes, block by block.

  JAX: ``lifter.Block`` under ``jax.grad``, compiled with the production
  options; torch: the reference ``_Block``'s ``backward()``. Same weights, drop
  path off, the same cotangent; the outputs compared are the input gradient
  and the weight gradients (in the JAX layout).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from contextpose_jax import compiler_options  # pylint: disable=g-import-not-at-top
  from contextpose_jax.models import torch_import  # pylint: disable=g-import-not-at-top
  from contextpose_jax.models.lifter import Block  # pylint: disable=g-import-not-at-top
  from torch_reference.common import randomize_, state_dict_numpy
  from torch_reference.lifter import _Block

  shape = BLOCK_STACKS[stack](batch, levels, embed_dim)
  torch.manual_seed(seed)
  torch_block = randomize_(_Block(shape[-1], num_heads, 2.0, 0.0), seed)
  block = Block(num_heads, 2.0, drop_path=0.0)
  rng = np.random.default_rng(seed + 5)
  x, cotangent = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
  target_shapes = jax.eval_shape(functools.partial(block.init, deterministic=True),
                                 jax.random.PRNGKey(0), x)

  def to_jax_layout(state_dict, source):
    return torch_import.convert_state_dict(state_dict, target_shapes, source=source)["params"]
  params = to_jax_layout(state_dict_numpy(torch_block), "random block")

  def objective(p, x):
    return jnp.sum(block.apply({"params": p}, x, deterministic=True) * cotangent)
  grad = compiler_options.jit(jax.grad(objective, argnums=(0, 1)))
  j_params, j_x = jax.device_put(params), jax.device_put(x)

  def jax_call():
    return jax.block_until_ready(grad(j_params, j_x))

  device = _torch_device()
  torch_block = torch_block.to(device)
  t_x = torch.tensor(x, device=device)
  t_cot = torch.tensor(cotangent, device=device)

  def torch_call():
    torch_block.zero_grad(set_to_none=True)
    t_in = t_x.detach().requires_grad_()
    (torch_block(t_in) * t_cot).sum().backward()
    _torch_sync()
    return {k: p.grad for k, p in torch_block.named_parameters()}, t_in.grad

  def compare(out):  # off the clock: only the first call's outputs
    param_grads, x_grad = out
    if isinstance(x_grad, torch.Tensor):  # torch: the weight gradients in the JAX layout
      param_grads = to_jax_layout(torch_import.to_numpy(param_grads), "torch block gradients")
    return _to_numpy([x_grad, *jax.tree.leaves(param_grads)])

  return Workload(f"lifter {stack} block fwd+bwd, {shape} tokens (batch {batch})", batch,
                  "examples/s", {"jax fp32": jax_call, "torch fp32": torch_call},
                  "torch fp32", compare, kind="block")


def comparable_weights(params) -> list[np.ndarray]:
  """The lifter's weights as arrays, without the attention KEY biases.

  Softmax ignores a constant added to all logits, so the loss gradient of the
  key bias is exactly 0 and what either framework computes is rounding noise;
  Adam's first step normalises that noise to an arbitrary +-lr step.
  """
  import jax  # pylint: disable=g-import-not-at-top
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.asarray(leaf)
    names = [getattr(k, "key", None) for k in path]
    if names[-2:] == ["qkv", "bias"]:
      dim = leaf.shape[0] // 3
      leaf = np.concatenate([leaf[:dim], leaf[2 * dim:]])  # q and v biases
    out.append(leaf)
  return out

_TRAIN_CONFIGS = {"hrnet_32": "h36m_hrnet32", "hrnet_48": "h36m_hrnet48", "cpn": "h36m_cpn"}


def train_config(backbone: str, model_config, batch: int):
  """The production config for ``backbone`` (``configs/h36m_*.py``: lr, AdamW
  settings), with the benchmark's model and batch."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{_TRAIN_CONFIGS[backbone]}").get_config()
  config.model = model_config.copy_and_resolve_references()
  config.batch_size = batch
  return config


def set_torch_drop_path(lifter, rate: float) -> None:
  """The official per-block drop path rates, linspace(0, rate, depth), on a
  torch ``PoseTransformer`` (the torch CA-PF always builds it with 0.2)."""
  import torch  # pylint: disable=g-import-not-at-top
  for blocks in (lifter.joint_blocks, lifter.res_blocks, lifter.context_blocks or ()):
    for block, r in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist()):
      block.drop_path.rate = r


def train_step_workload(backbone: str, batch: int, *, models=None,
                        drop_path_rate: float | None = None, seed: int = 0,
                        **model_kwargs) -> Workload:
  """ONE training step as ``main.py`` runs it, full model, frozen backbone.

  JAX: the production step itself -- ``steps.make_train_step`` (BatchNorm
  folded in the step), ``steps.create_train_state``, ``steps.make_optimizer``
  and ``steps.learning_rate_fn`` of the backbone's config, ``parallel.make_mesh``
  and ``parallel.global_batch`` (the host batch is placed in every call, as
  the training loop does). Torch: the reference CA-PF, backbone in eval mode
  under ``no_grad``, lifter in train mode, MPJPE loss, backward,
  ``torch.optim.AdamW`` with the config's lr / betas / eps / weight decay.
  ``drop_path_rate`` None: the config's (official 0.2; the two frameworks then
  draw different masks, so the outputs are not compared). Compared outputs:
  the loss and the updated lifter weights after each one's FIRST step.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from contextpose_jax import parallel, steps  # pylint: disable=g-import-not-at-top
  from contextpose_jax.models import capf, torch_import  # pylint: disable=g-import-not-at-top
  from torch_reference.common import state_dict_numpy

  torch_model, variables, model_config = models or build_models(backbone, seed=seed,
                                                                **model_kwargs)
  config = train_config(backbone, model_config, batch)
  if drop_path_rate is not None:
    config.model.drop_path_rate = drop_path_rate
  images, kp2d, crop = _random_inputs(batch, seed + 7)
  target = np.random.default_rng(seed + 11).normal(0, 0.3, (batch, 17, 3)).astype(np.float32)
  target[:, 0] = 0  # root-relative, as the training targets
  host_batch = {"image": images, "keypoints_2d": kp2d, "keypoints_2d_crop": crop,
                "keypoints_3d": target}

  model = capf.build_model(config.model)
  mesh = parallel.make_mesh()
  tx = steps.make_optimizer(config)
  lr_fn = steps.learning_rate_fn(config, 1000)
  # Host copies first: the step donates its state, which must not alias the
  # variables other workloads share.
  variables = jax.tree.map(np.array, variables)
  state = jax.device_put(steps.create_train_state(config, model, variables, tx),
                         parallel.replicated(mesh))
  train_step = steps.make_train_step(model, tx, lr_fn, mesh, train_backbone=False)
  holder = {"state": state}

  def jax_call():
    holder["state"], metrics = train_step(holder["state"],
                                          parallel.global_batch(host_batch, mesh))
    jax.block_until_ready((holder["state"], metrics))
    return metrics["loss"], holder["state"].params["lifter"]

  device = _torch_device()
  torch_model = copy.deepcopy(torch_model).to(device).eval()  # our own: it trains
  lifter = torch_model.volume_net.train()
  set_torch_drop_path(lifter, config.model.drop_path_rate)
  for p in torch_model.backbone.parameters():
    p.requires_grad_(False)
  optimizer = torch.optim.AdamW(lifter.parameters(), lr=config.learning_rate,
                                betas=(config.b1, config.b2), eps=config.eps,
                                weight_decay=config.weight_decay)
  crop_scale = torch.tensor([96.0, 128.0], device=device)  # CAPF.forward's mapping

  def torch_call():
    t_images, t_kp2d, t_crop, t_target = (
        torch.from_numpy(host_batch[k]).to(device) for k in
        ("image", "keypoints_2d", "keypoints_2d_crop", "keypoints_3d"))
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
      feats = torch_model.backbone(t_images.permute(0, 3, 1, 2).contiguous())
    pred = lifter(t_kp2d, t_crop / crop_scale - 1.0, list(feats))
    loss = torch.linalg.norm(pred[:, 0] - t_target, dim=-1).mean()
    loss.backward()
    optimizer.step()
    _torch_sync()
    return loss, lifter

  initial = jax.tree.map(np.asarray, variables["params"]["lifter"])
  shapes = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), initial)}

  def compare(out):
    loss, weights = out
    if hasattr(weights, "state_dict"):  # torch: the weights in the JAX layout
      weights = torch_import.convert_state_dict(state_dict_numpy(weights), shapes,
                                                source="torch lifter")["params"]
      loss = loss.detach().cpu()
    return [np.asarray(loss)] + comparable_weights(weights)

  return Workload(f"train step (production) {backbone}, batch {batch}", batch, "examples/s",
                  {"jax fp32": jax_call, "torch fp32": torch_call}, "torch fp32", compare,
                  comparable=config.model.drop_path_rate == 0.0,
                  extras={"initial_params": initial}, kind="train_step", backbone=backbone)


# The compile rows' child process: a fresh interpreter (compiled programs are
# cached in memory per process), the persistent cache where the parent says.
_FIRST_CALL_CHILD = """
import json, sys
from contextpose_jax import compile_cache
compile_cache.enable()
from benchmarks import speed
print("FIRST_CALL " + json.dumps(speed.first_call_times(**json.loads(sys.argv[1]))))
"""


def first_call_times(backbone: str, batch: int, seed: int = 0, **model_kwargs) -> dict:
  """Seconds of ``Predictor.predict``'s first call (BatchNorm folding +
  compilation or a cache load + one run) and of its second call."""
  from contextpose_jax.api import Predictor  # pylint: disable=g-import-not-at-top
  from contextpose_jax.models import capf  # pylint: disable=g-import-not-at-top
  _, variables, config = build_models(backbone, seed=seed, **model_kwargs)
  images, kp2d, crop = _random_inputs(batch, seed + 7)
  predictor = Predictor(capf.build_model(config), variables, config)
  times = []
  for _ in range(2):
    start = time.perf_counter()
    predictor.predict(images, kp2d, crop)
    times.append(time.perf_counter() - start)
  return {"first_s": times[0], "second_s": times[1]}


def first_call_rows(backbone: str, batch: int, *, cache_dir: str | None = None,
                    timeout: float = 1800, log=None, **model_kwargs) -> list[Row]:
  """Cold and warm first call of the production predictor, each in a new process.

  Cold: an empty persistent-cache directory (``cache_dir``, default a new
  temporary one); warm: a second process reusing it. Each row's "first call"
  is that process's first ``predict``; its median / best call is the second.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = json.dumps({"backbone": backbone, "batch": batch, **model_kwargs})
  with tempfile.TemporaryDirectory(prefix="capf_compile_cache_") as tmp:
    directory = cache_dir or tmp
    if os.path.isdir(directory) and os.listdir(directory):
      raise ValueError(f"the cold row needs an empty cache directory: {directory}")
    env = dict(os.environ, CONTEXTPOSE_JAX_CACHE=directory)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    rows = []
    for impl in ("jax fp32, cold cache", "jax fp32, warm cache (2nd process)"):
      proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_CHILD, spec], cwd=repo,
                            env=env, capture_output=True, text=True, timeout=timeout)
      line = [l for l in proc.stdout.splitlines() if l.startswith("FIRST_CALL ")]
      if proc.returncode or not line:
        raise RuntimeError(f"first-call child failed ({proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
      t = json.loads(line[-1].split(" ", 1)[1])
      timing = Timing(first_s=t["first_s"], median_s=t["second_s"], times=[t["second_s"]])
      rows.append(Row(f"first call (compilation) {backbone} predict, batch {batch}", impl,
                      batch, timing=timing, kind="compile", backbone=backbone))
      if log:
        log(f"  {rows[-1].group} | {impl}: first call {t['first_s']:.1f} s, second "
            f"{t['second_s'] * 1e3:.1f} ms; cache files: {len(os.listdir(directory))}")
  return rows


def _map_coordinates_sample(feature_map, coords, padding_mode: str):
  """Bilinear align_corners=True sampling through ``map_coordinates``."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.scipy import ndimage  # pylint: disable=g-import-not-at-top
  _, h, w, _ = feature_map.shape
  x = (coords[..., 0] + 1) * (0.5 * (w - 1))
  y = (coords[..., 1] + 1) * (0.5 * (h - 1))
  # 'border' clamps the position to the map = scipy's 'nearest' for order 1;
  # 'zeros' = 'constant' with cval 0 (out-of-map corners contribute 0).
  mode = "nearest" if padding_mode == "border" else "constant"

  def one_channel(channel, y, x):
    return ndimage.map_coordinates(channel, [y, x], order=1, mode=mode)
  per_channel = jax.vmap(one_channel, in_axes=(2, None, None), out_axes=-1)
  return jax.vmap(per_channel)(feature_map, y, x)


def sampler_workload(backbone: str, batch: int, *, backward: bool = False,
                     points_per_joint: int = 16, backbone_kwargs=None,
                     seed: int = 0) -> Workload:
  """The deformable blocks' sampling: ``batch x 17 x points_per_joint`` points
  in each of the 4 maps, 'border' padding (forward, or forward + backward to
  the maps and the points)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from contextpose_jax.models import sampler  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  maps = [rng.normal(size=s).astype(np.float32)
          for s in feature_shapes(backbone, batch, backbone_kwargs)]
  points = rng.uniform(-1.1, 1.1, (batch, 17 * points_per_joint, 2)).astype(np.float32)
  cotangents = [rng.normal(size=(batch, points.shape[1], m.shape[-1])).astype(np.float32)
                for m in maps]

  def jax_impl(sample):
    def forward(maps, points):
      return [sample(m, points, "border") for m in maps]
    if not backward:
      fn = jax.jit(forward)
      return lambda m, p: fn(m, p)

    def objective(maps, points):
      return sum(jnp.sum(o * c) for o, c in zip(forward(maps, points), cotangents))
    fn = jax.jit(jax.grad(objective, argnums=(0, 1)))
    return lambda m, p: (lambda g: [*g[0], g[1]])(fn(m, p))

  j_maps, j_points = jax.device_put(maps), jax.device_put(points)
  impls = {}
  for name, sample in (("jax gather (ours)", sampler.grid_sample),
                       ("jax map_coordinates", _map_coordinates_sample)):
    impls[name] = functools.partial(_jax_blocking(jax_impl(sample)), j_maps, j_points)

  device = _torch_device()
  t_maps = [torch.tensor(m, device=device).permute(0, 3, 1, 2).contiguous() for m in maps]
  t_grid = torch.tensor(points, device=device)[:, :, None, :]  # (B, P, 1, 2)
  t_cot = [torch.tensor(c, device=device) for c in cotangents]

  def torch_forward(maps, grid):
    return [F.grid_sample(m, grid, mode="bilinear", padding_mode="border",
                          align_corners=True)[..., 0].transpose(1, 2) for m in maps]

  def torch_call():
    if not backward:
      with torch.no_grad():
        out = torch_forward(t_maps, t_grid)
      _torch_sync()
      return out
    maps = [m.detach().requires_grad_() for m in t_maps]
    grid = t_grid.detach().requires_grad_()
    objective = sum((o * c).sum() for o, c in zip(torch_forward(maps, grid), t_cot))
    objective.backward()
    _torch_sync()
    return [m.grad.permute(0, 2, 3, 1) for m in maps] + [grid.grad[:, :, 0]]
  impls["torch grid_sample"] = torch_call
  what = "fwd+bwd" if backward else "fwd"
  return Workload(f"context sampler {what}, {backbone} maps, batch {batch} "
                  f"(17x{points_per_joint} pts)", batch, "examples/s", impls,
                  "torch grid_sample", _to_numpy,
                  kind="sampler fwd+bwd" if backward else "sampler fwd", backbone=backbone)


# The conv rows' shapes: (input NHWC at batch 1, output channels, kernel,
# stride), from HRNet-W32 (branch 3x3 convs of widths 32..256, the stride-2
# stem) and CPN (its 1x1 lateral conv).
CONV_SHAPES = (((64, 48, 32), 32, 3, 1), ((32, 24, 64), 64, 3, 1),
               ((16, 12, 128), 128, 3, 1), ((8, 6, 256), 256, 3, 1),
               ((128, 96, 64), 64, 3, 2), ((64, 48, 256), 256, 1, 1))


def conv_workload(shape, features: int, kernel: int, stride: int, batch: int, *,
                  dtype: str = "float32", seed: int = 0) -> Workload:
  """One convolution: the compiled program with our CPU options (Eigen), with
  XLA's default (YNNPACK), and torch (float32 only: its bf16 CPU conv is
  another kernel family)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from contextpose_jax import compiler_options  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, *shape)).astype(np.float32)
  w = (rng.normal(size=(kernel, kernel, shape[-1], features)) /
       np.sqrt(kernel * kernel * shape[-1])).astype(np.float32)
  pad = kernel // 2

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  j_x, j_w = (jax.device_put(jnp.asarray(a, dtype)) for a in (x, w))
  impls = {}
  for name, options in (("jax eigen (ours)", compiler_options.for_platform("cpu")),
                        ("jax ynnpack (XLA default)", None)):
    fn = jax.jit(conv, compiler_options=options)
    impls[name] = functools.partial(_jax_blocking(fn), j_x, j_w)
  reference = None
  if dtype == "float32":
    device = _torch_device()
    t_x = torch.tensor(x, device=device).permute(0, 3, 1, 2).contiguous()
    t_w = torch.tensor(w, device=device).permute(3, 2, 0, 1).contiguous()

    def torch_call():
      with torch.no_grad():
        out = F.conv2d(t_x, t_w, stride=stride, padding=pad)
      _torch_sync()
      return out.permute(0, 2, 3, 1)
    impls["torch"] = torch_call
    reference = "torch"

  def float64_answer():
    # Every row against the exact convolution of the inputs it was given.
    r_x, r_w = (np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, w))
    out = F.conv2d(torch.tensor(r_x).permute(0, 3, 1, 2), torch.tensor(r_w).permute(3, 2, 0, 1),
                   stride=stride, padding=pad)
    return out.permute(0, 2, 3, 1).numpy()
  h, w_, c = shape
  return Workload(f"conv {h}x{w_}x{c} -> {features}, {kernel}x{kernel}/{stride}, batch {batch}, "
                  f"{dtype}", batch, "images/s", impls, reference,
                  lambda out: _to_numpy(out).astype(np.float32), exact=float64_answer,
                  kind="conv")


def run_workload(work: Workload, *, warmup: int, repeats: int, log=None) -> list[Row]:
  """Times the implementations (interleaved) and compares their outputs.

  The outputs compared are those of each implementation's FIRST call, taken
  (through ``work.compare``) before any later call can change or donate them.
  Rows are compared with ``work.exact`` (e.g. torch in float64) when the
  workload has it, else with the reference (torch) row.
  """
  outputs = work.outputs

  def recording(name, fn):
    def call():
      out = fn()
      if name not in outputs:
        outputs[name] = work.compare(out)
    return call
  timings = measure_interleaved({n: recording(n, f) for n, f in work.impls.items()},
                                warmup=warmup, repeats=repeats)
  rows = [Row(work.group, name, work.items, work.unit, timing,
              reference=name == work.reference, kind=work.kind, backbone=work.backbone)
          for name, timing in timings.items()]
  if work.comparable:
    if work.exact is not None:
      exact = work.exact()
      for row in rows:
        row.max_diff = _max_diff(outputs[row.impl], exact)
    elif work.reference in outputs:
      for row in rows:
        if not row.reference:
          row.max_diff = _max_diff(outputs[row.impl], outputs[work.reference])
  if log:
    for row in rows:
      log(f"  {work.group} | {row.impl}: median {row.timing.median_s * 1e3:.1f} ms, "
          f"best {min(row.timing.times) * 1e3:.1f} ms (first call "
          f"{row.timing.first_s:.1f} s), max|diff| {row.max_diff}")
  return rows


# ----------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------


def _uptime() -> str:
  """``uptime``'s line (the load averages), or the load averages alone."""
  import subprocess  # pylint: disable=g-import-not-at-top
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True,
                          timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine_info() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  device = jax.devices()[0]
  return {
      "date": _now(),
      "cpu": cpu, "cpu_count": os.cpu_count(),
      "jax": f"{jax.__version__} ({device.platform}: {device.device_kind})",
      "torch": f"{torch.__version__} ({_torch_device()}, {torch.get_num_threads()} threads)",
      "python": platform.python_version(),
      "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", "unset"),
      "uptime_start": _uptime(),
  }


def format_header(command: str, info: dict) -> str:
  """The table's header: command, machine, date and ``uptime`` at start and end."""
  keys = ("cpu", "cpu_count", "jax", "torch", "python", "OMP_WAIT_POLICY", "XLA_FLAGS",
          "compilation_cache", "host_malloc")
  return "\n".join([
      "```bash", command, "```", "",
      "Machine: " + "; ".join(f"{k}: {info[k]}" for k in keys if k in info) + ".",
      f"Date: {info['date']} to {info.get('date_end', '?')}.",
      f"Load at start: `{info['uptime_start']}`",
      f"Load at end: `{info.get('uptime_end', '?')}`"]
      + [f"Peak device memory: " + ", ".join(
          f"{k} {v / 2**30:.2f} GiB" for k, v in info["peak_device_memory"].items())]
      * bool(info.get("peak_device_memory")))


# Small backbones and lifter for a smoke run of every row (--tiny).
TINY_BACKBONES = {
    "hrnet_32": dict(width=8, stage_modules=[1, 1, 1], num_blocks=1, stem_channels=8,
                     layer1_blocks=1),
    "hrnet_48": dict(width=8, stage_modules=[1, 1, 1], num_blocks=1, stem_channels=8,
                     layer1_blocks=1),
    "cpn": dict(resnet_layers=[1, 1, 1, 1], width=8, lateral_channels=16),
}
TINY_LIFTER = dict(embed_dim=32, depth=1)


_FLAGS = flags.FlagValues()  # this CLI's own: importable beside other CLIs
flags.DEFINE_string("rows", ",".join(ALL_ROWS), f"comma list of {', '.join(ALL_ROWS)}",
                    flag_values=_FLAGS)
flags.DEFINE_string("backbones", ",".join(BACKBONES), "comma list of backbones",
                    flag_values=_FLAGS)
flags.DEFINE_string("batch_sizes", "1,8", "full-model batch sizes", flag_values=_FLAGS)
flags.DEFINE_string("dtypes", "float32,bfloat16",
                    "JAX backbone dtypes of the BN-folded Predictor rows", flag_values=_FLAGS)
flags.DEFINE_bool("unfolded", True, "also a Predictor(fold_batch_norm=False) fp32 row",
                  flag_values=_FLAGS)
flags.DEFINE_integer("train_step_batch", 64, "production train step batch",
                     flag_values=_FLAGS)
flags.DEFINE_string("train_step_backbones", "",
                    "backbones of the train_step rows (default: --backbones)",
                    flag_values=_FLAGS)
flags.DEFINE_integer("train_step_repeats", 0,
                     "timed calls of the train_step rows (0: --repeats)", flag_values=_FLAGS)
flags.DEFINE_integer("train_batch", 64, "lifter-only train step batch", flag_values=_FLAGS)
flags.DEFINE_integer("sampler_batch", 64, "context sampler batch", flag_values=_FLAGS)
flags.DEFINE_integer("conv_batch", 8, "batch of the conv rows", flag_values=_FLAGS)
flags.DEFINE_string("compile_backbone", "hrnet_32", "backbone of the compile rows",
                    flag_values=_FLAGS)
flags.DEFINE_integer("compile_batch", 1, "Predictor batch of the compile rows",
                     flag_values=_FLAGS)
flags.DEFINE_integer("pipeline_batch", 256, "input pipeline batch", flag_values=_FLAGS)
flags.DEFINE_integer("pipeline_batches", 20, "input pipeline batches timed",
                     flag_values=_FLAGS)
paths.define_path("data_dir", None,
                  "TFDS data dir for the pipeline row (default: a synthetic set "
                  "built in a temporary directory, not timed)", flag_values=_FLAGS)
flags.DEFINE_string("dataset", "synthetic_human36m", "TFDS name for the pipeline row",
                    flag_values=_FLAGS)
flags.DEFINE_integer("warmup", 2, "untimed calls after the first", flag_values=_FLAGS)
flags.DEFINE_integer("repeats", 5, "timed calls (median)", flag_values=_FLAGS)
flags.DEFINE_bool("quick", False,
                  "hrnet_32 only, full-model batch 2, train / sampler batch 16, "
                  "train step batch 4, 3 repeats, 1 warm-up, a short pipeline run",
                  flag_values=_FLAGS)
flags.DEFINE_bool("tiny", False,
                  "smoke test of the machinery, NOT a measurement: tiny backbones "
                  "(width 8) and lifter (C = 32, depth 1), batch 2-4, 1 repeat, "
                  "no warm-up; rows default to model,train_step,train,sampler,compile",
                  flag_values=_FLAGS)
paths.define_path("compilation_cache", None,
                  "persistent JAX compilation cache directory of this process "
                  "(default: contextpose_jax.compile_cache's; 'off': none). The "
                  "compile rows use their own fresh directory", flag_values=_FLAGS,
                  keep=compile_cache.OFF)
flags.DEFINE_enum("host_malloc", "off", host_memory.SETTINGS,
                  "contextpose_jax.host_memory's glibc malloc settings for this "
                  "process, torch's calls included. Off by default: the PyTorch "
                  "reference is timed as the official model runs (glibc's defaults); "
                  "'on' times both frameworks with them (docs/benchmarks.md, Host memory)",
                  flag_values=_FLAGS)
flags.DEFINE_enum("omp_wait_policy", "PASSIVE", ("PASSIVE", "ACTIVE", "unset"),
                  "OMP_WAIT_POLICY for torch (set before torch starts). PASSIVE by "
                  "default: torch's OpenMP threads spin-waiting at every op's barrier "
                  "collapse (10-40x slower) when other processes share the cores",
                  flag_values=_FLAGS)
paths.define_path("json", None, "also write the rows and machine here", flag_values=_FLAGS)


def parse_args(argv):
  """The command line (no program name) as attributes, lists split; `cli.Exit`
  (a SystemExit) after `--help` or on a bad command line."""
  positional = cli.parse(_FLAGS, argv, __doc__)
  if positional:
    raise cli.error(f"unexpected arguments {positional}")
  args = cli.values(_FLAGS)
  if args.quick and args.tiny:
    raise cli.error("--quick and --tiny: choose one")
  if args.quick:
    args.backbones, args.batch_sizes = "hrnet_32", "2"
    args.train_batch = args.sampler_batch = 16
    args.train_step_batch = 4
    args.repeats, args.warmup = 3, 1
    args.pipeline_batch, args.pipeline_batches = 64, 10
  args.model_kwargs = {}
  if args.tiny:
    if _FLAGS["rows"].using_default_value:
      args.rows = "model,train_step,train,sampler,compile"
    args.batch_sizes = "2"
    args.train_batch = args.sampler_batch = args.train_step_batch = args.conv_batch = 4
    args.repeats, args.warmup = 1, 0
    args.model_kwargs = dict(TINY_LIFTER)
  if "fold" in args.rows.split(","):
    raise cli.error("--rows=fold is gone: the model rows run the Predictor, BatchNorm "
                    "folded (its default) and unfolded (--unfolded)")
  args.rows = [r for r in args.rows.split(",") if r]
  unknown = set(args.rows) - set(ALL_ROWS)
  if unknown:
    raise cli.error(f"--rows: unknown {sorted(unknown)}; choose from {ALL_ROWS}")
  args.backbones = [b for b in args.backbones.split(",") if b]
  args.train_step_backbones = ([b for b in args.train_step_backbones.split(",") if b]
                               or list(args.backbones))
  for name in ("backbones", "train_step_backbones"):
    if set(getattr(args, name)) - set(BACKBONES):
      raise cli.error(f"--{name}: choose from {BACKBONES}")
  if args.compile_backbone not in BACKBONES:
    raise cli.error(f"--compile_backbone: choose from {BACKBONES}")
  try:
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
  except ValueError:
    raise cli.error(f"--batch_sizes: integers expected, got {args.batch_sizes!r}") from None
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  if set(args.dtypes) - {"float32", "bfloat16"}:
    raise cli.error("--dtypes: choose from float32, bfloat16")
  return args


def run(args, log=print) -> tuple[list[Row], dict]:
  # First: malloc's arenas are chosen by each thread at its first allocation.
  host_devices.skip_absent_backends()
  host_malloc = host_memory.configure(args.host_malloc) or host_memory.applied()
  import torch  # pylint: disable=g-import-not-at-top
  from contextpose_jax import compile_cache  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  # Before anything compiles: JAX reads the cache setting at its first compilation.
  cache_dir = compile_cache.enable(args.compilation_cache or "default")
  info = machine_info()
  info["compilation_cache"] = cache_dir
  info["host_malloc"] = "on" if host_malloc else "off"
  log(json.dumps(info))
  timing = dict(warmup=args.warmup, repeats=args.repeats, log=log)
  tiny = bool(args.tiny)

  def kwargs(backbone):  # the model size: full, or --tiny's
    return dict(args.model_kwargs, **({"backbone_kwargs": TINY_BACKBONES[backbone]}
                                      if tiny else {}))
  rows: list[Row] = []
  model_backbones = [b for b in args.backbones
                     if "model" in args.rows or ("train_step" in args.rows
                                                 and b in args.train_step_backbones)]
  for backbone in model_backbones:
    models = build_models(backbone, **kwargs(backbone))
    if "model" in args.rows:
      for batch in args.batch_sizes:
        work = full_model_workload(backbone, batch, dtypes=args.dtypes, models=models,
                                   unfolded=args.unfolded)
        rows += run_workload(work, **timing)
    if "train_step" in args.rows and backbone in args.train_step_backbones:
      work = train_step_workload(backbone, args.train_step_batch, models=models)
      rows += run_workload(work, **dict(timing, repeats=args.train_step_repeats
                                        or args.repeats))
    del models
  for backbone in args.train_step_backbones:
    if "train_step" in args.rows and backbone not in model_backbones:
      work = train_step_workload(backbone, args.train_step_batch, **kwargs(backbone))
      rows += run_workload(work, **dict(timing, repeats=args.train_step_repeats
                                        or args.repeats))
  if "train" in args.rows:
    for backbone in args.backbones:
      rows += run_workload(lifter_train_workload(backbone, args.train_batch,
                                                 **kwargs(backbone)), **timing)
  if "blocks" in args.rows:
    block_size = dict(embed_dim=args.model_kwargs.get("embed_dim", 128))
    for stack in BLOCK_STACKS:
      rows += run_workload(lifter_block_workload(stack, args.train_batch, **block_size),
                           **timing)
  if "sampler" in args.rows:
    for backward in (False, True):
      rows += run_workload(sampler_workload(
          args.backbones[0], args.sampler_batch, backward=backward,
          backbone_kwargs=TINY_BACKBONES[args.backbones[0]] if tiny else None), **timing)
  if "conv" in args.rows:
    for shape, features, kernel, stride in CONV_SHAPES:
      if tiny:  # a quarter of the spatial size, an eighth of the channels
        shape = (shape[0] // 4, shape[1] // 4, max(4, shape[2] // 8))
        features = max(4, features // 8)
      for dtype in args.dtypes:
        rows += run_workload(conv_workload(shape, features, kernel, stride,
                                           args.conv_batch, dtype=dtype), **timing)
  if "compile" in args.rows:
    rows += first_call_rows(args.compile_backbone, args.compile_batch, log=log,
                            **kwargs(args.compile_backbone))
  if "pipeline" in args.rows:
    from benchmarks import data_throughput as throughput  # pylint: disable=g-import-not-at-top
    rate = throughput.measure(args.data_dir, name=args.dataset,
                              batch_size=args.pipeline_batch,
                              num_batches=args.pipeline_batches, log=log)
    rows.append(Row(f"input pipeline ({args.dataset}, batch {args.pipeline_batch})",
                    "grain + OpenCV", args.pipeline_batch, "examples/s", rate=rate,
                    kind="pipeline"))
  info["date_end"], info["uptime_end"] = _now(), _uptime()
  info["peak_device_memory"] = peak_device_memory()
  return rows, info


def peak_device_memory() -> dict[str, int]:
  """Each framework's peak accelerator memory over the run (bytes; empty on
  a CPU, where neither framework tracks it)."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  out = {}
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    out["jax"] = int(stats["peak_bytes_in_use"])
  if torch.cuda.is_available():
    out["torch"] = int(torch.cuda.max_memory_allocated())
  return out


def main(argv=None) -> int:
  """The command line (argv without the program name): 0 after the table or
  `--help`, 2 for a bad command line (one `error:` line on stderr)."""
  try:
    args = parse_args(argv)
  except cli.Exit as e:
    return e.code
  if args.omp_wait_policy != "unset":
    if "torch" in sys.modules:
      print("warning: torch is already imported; --omp_wait_policy has no effect",
            file=sys.stderr)
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
  command = "python -m benchmarks.speed " + " ".join(
      argv if argv is not None else sys.argv[1:])
  rows, info = run(args, log=lambda *a: print(*a, file=sys.stderr, flush=True))
  print(format_header(command, info) + "\n")
  print(format_table(rows) + "\n")
  print("Issue #9 targets (JAX row: the production path; verdict from the median):\n")
  print(format_targets(rows))
  if args.json:
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"command": command, "machine": info,
                 "rows": [r.as_dict() for r in rows]}, f, indent=1)
    os.replace(tmp, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
