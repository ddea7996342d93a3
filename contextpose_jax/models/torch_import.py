"""Strict conversion of PyTorch state dicts into Flax variable trees.

One naming rule serves every model family: the torch key ``a.0.b.1.weight``
names the Flax module path ``a_0/b_1`` (split on '.', every all-digit segment
merged into the previous one with '_'), so each family only has to name its
Flax submodules after the official torch attributes. The kind of layer is read
off the Flax target tree, never guessed from the key:

- a 4-D ``kernel``: convolution, torch (O, I, kh, kw) -> Flax (kh, kw, I, O);
- a 2-D ``kernel``: dense, torch (out, in) -> Flax (in, out);
- ``batch_stats`` beside ``scale``: BatchNorm (running stats -> mean / var);
- ``scale`` without batch stats: LayerNorm;
- any other leaf name: a bare ``nn.Parameter`` of that name in its module.

Strict means: every target leaf filled exactly once, every source tensor used
or matched by an explicit ``ignore`` pattern, every shape checked; all problems
are reported together in one ``ConversionError``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

# BatchNorm bookkeeping counters carry no numbers the Flax model uses.
_ALWAYS_IGNORED = (r"(^|\.)num_batches_tracked$",)


class ConversionError(ValueError):
  """A checkpoint does not match the model it is converted into."""


def flax_path(torch_key: str) -> tuple[str, ...]:
  """``'stage2.0.branches.1.3.conv1.weight'`` -> module path + torch leaf.

  Returns ``('stage2_0', 'branches_1_3', 'conv1', 'weight')``.
  """
  parts: list[str] = []
  for segment in torch_key.split("."):
    if segment.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{segment}"
    else:
      parts.append(segment)
  return tuple(parts)


def to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Torch tensors (or arrays) -> float/int numpy arrays, keys unchanged."""
  out = {}
  for key, value in state_dict.items():
    if hasattr(value, "detach"):
      value = value.detach().cpu().numpy()
    out[key] = np.asarray(value)
  return out


def _shape_of(leaf) -> tuple[int, ...]:
  return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _plan(module_path, leaf, params, stats):
  """Where a torch leaf goes: (collection, flax key, transform) or None."""
  def has(collection, name):
    return (*module_path, name) in collection

  if leaf == "weight":
    if has(params, "kernel"):
      ndim = len(_shape_of(params[(*module_path, "kernel")]))
      if ndim == 4:
        return "params", (*module_path, "kernel"), lambda w: w.transpose(2, 3, 1, 0)
      if ndim == 2:
        return "params", (*module_path, "kernel"), lambda w: w.T
      return None
    if has(params, "scale"):
      return "params", (*module_path, "scale"), None
    return None
  if leaf == "bias" and has(params, "bias"):
    return "params", (*module_path, "bias"), None
  if leaf == "running_mean" and has(stats, "mean"):
    return "batch_stats", (*module_path, "mean"), None
  if leaf == "running_var" and has(stats, "var"):
    return "batch_stats", (*module_path, "var"), None
  if leaf not in ("weight", "bias") and has(params, leaf):
    return "params", (*module_path, leaf), None  # a bare nn.Parameter
  return None


def convert_state_dict(state_dict: Mapping[str, Any],
                       target: Mapping[str, Any],
                       *,
                       ignore: Iterable[str] = (),
                       rename: Callable[[str], str] | None = None,
                       source: str = "checkpoint") -> dict[str, Any]:
  """Converts ``state_dict`` into a Flax variables dict shaped like ``target``.

  Args:
    state_dict: torch key -> tensor or array (prefixes already stripped).
    target: Flax variables (arrays or ShapeDtypeStructs), e.g. from
      ``jax.eval_shape(module.init, ...)``; collections 'params' and
      optionally 'batch_stats'.
    ignore: regexes of source keys known to be unused by the Flax model.
    rename: maps a source key to the torch-style key of its Flax target
      (e.g. the official ``volume_net.`` -> ``lifter.``); messages keep the
      source names.
    source: what the state dict came from, for the error message.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays (only the
    collections that ``target`` has).

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  patterns = [re.compile(p) for p in (*_ALWAYS_IGNORED, *ignore)]
  params = traverse_util.flatten_dict(dict(target.get("params", {})))
  stats = traverse_util.flatten_dict(dict(target.get("batch_stats", {})))
  filled: dict[str, dict[tuple[str, ...], np.ndarray]] = {
      "params": {}, "batch_stats": {}}
  filled_by: dict[tuple[str, tuple[str, ...]], str] = {}
  unexpected, misshaped, duplicated = [], [], []

  for key, value in state_dict.items():
    if any(p.search(key) for p in patterns):
      continue
    *module_path, leaf = flax_path(rename(key) if rename else key)
    plan = _plan(tuple(module_path), leaf, params, stats)
    if plan is None:
      unexpected.append(key)
      continue
    collection, flax_key, transform = plan
    value = np.asarray(value)
    if transform is not None and value.ndim == len(
        _shape_of((params if collection == "params" else stats)[flax_key])):
      value = transform(value)
    want = _shape_of((params if collection == "params" else stats)[flax_key])
    if value.shape != want:
      misshaped.append(f"{key} {tuple(np.asarray(state_dict[key]).shape)} "
                       f"-> {'/'.join(flax_key)} {want}")
      filled_by[(collection, flax_key)] = key
      continue
    if (collection, flax_key) in filled_by:
      duplicated.append(f"{key} and {filled_by[(collection, flax_key)]}")
      continue
    filled_by[(collection, flax_key)] = key
    filled[collection][flax_key] = value.astype(np.float32)

  missing = [f"{c}:{'/'.join(k)}" for c, tree in (("params", params),
                                                   ("batch_stats", stats))
             for k in tree if (c, k) not in filled_by]
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} (no source tensor for): "
                    + ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
  if unexpected:
    problems.append(f"unexpected {len(unexpected)}: " + ", ".join(unexpected[:12])
                    + (" ..." if len(unexpected) > 12 else ""))
  if misshaped:
    problems.append(f"mis-shaped {len(misshaped)}: " + "; ".join(misshaped[:8])
                    + (" ..." if len(misshaped) > 8 else ""))
  if duplicated:
    problems.append("filled twice: " + ", ".join(duplicated[:8]))
  if problems:
    raise ConversionError(f"{source}: does not match the model -- " + " | ".join(problems))

  out = {"params": traverse_util.unflatten_dict(filled["params"])}
  if stats:
    out["batch_stats"] = traverse_util.unflatten_dict(filled["batch_stats"])
  return out
