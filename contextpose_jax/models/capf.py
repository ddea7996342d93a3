"""The full CA-PF model: a frozen 2D-pose backbone + the context-aware lifter.

Also the one place where model variables are saved to / loaded from a
directory (the converter's output and the eval-only input): an orbax
checkpoint under ``variables/`` and the model config as ``model_config.json``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from contextpose_jax import fileio
from contextpose_jax import skeleton
from contextpose_jax.models import BACKBONES
from contextpose_jax.models import HRNET_WIDTHS
from contextpose_jax.models import MATMUL_PRECISIONS
from contextpose_jax.models import cpn
from contextpose_jax.models import folding
from contextpose_jax.models import hrnet
from contextpose_jax.models import materialize
from contextpose_jax.models import defaults
from contextpose_jax.models import torch_import
from contextpose_jax.models.lifter import Lifter

MODEL_CONFIG_FILE = "model_config.json"
HEATMAP_HEAD_MISSING = (
    "this model has no COCO heatmap head (CA-PF checkpoints never include it): convert a "
    "COCO backbone file (capf-convert --kind=hrnet_32|hrnet_48|cpn "
    "--input=pose_hrnet_w32_256x192.pth | pose_hrnet_w48_256x192.pth | "
    "CPN50_256x192.pth.tar) to get heatmaps and 2D keypoints")
VARIABLES_DIR = "variables"


# The COCO heatmap heads' module names: HRNet's `final_layer`, CPN's RefineNet
# `final_predict_{0,1,2}`. A COCO conversion's backbone has them; CA-PF's not.
HEATMAP_HEAD_MODULES = ("final_layer", "final_predict_")


def is_heatmap_head(path) -> bool:
  """Whether a variable path (names or jax key entries) lies in a heatmap head."""
  names = [str(getattr(k, "key", k)) for k in path]
  return any(n == HEATMAP_HEAD_MODULES[0] or n.startswith(HEATMAP_HEAD_MODULES[1])
             for n in names)


class CAPF(nn.Module):
  """Images + 2D pose -> root-relative 3D pose (B, 1, 17, 3), metres.

  Inputs follow the official forward: ``images`` (B, 256, 192, 3) normalized
  for the backbone, ``keypoints_2d`` (B, 17, 2) in normalized screen
  coordinates, ``keypoints_2d_crop`` (B, 17, 2) in crop pixels.
  """
  backbone: nn.Module | None
  lifter: Lifter
  train_backbone: bool = False

  def features(self, images, train: bool = False):
    """The four backbone maps (NHWC, at least float32) handed to the lifter."""
    maps = self.backbone(images, train=train and self.train_backbone)
    # Written to memory once: XLA:CPU would otherwise fuse each map's producer
    # into every corner gather of every sampler call (materialize.py).
    maps = [materialize.materialized(_at_least_f32(m)) for m in maps]
    if not self.train_backbone:
      maps = [jax.lax.stop_gradient(m) for m in maps]
    return maps

  @property
  def has_heatmap_head(self) -> bool:
    return bool(getattr(self.backbone, "heatmap_head", False))

  def heatmaps(self, images):
    """The COCO heatmaps (B, 64, 48, 17) NHWC of a backbone built with its
    head (``backbone_kwargs.heatmap_head``, set by the COCO converter)."""
    return self.features_and_heatmaps(images)[1]

  def features_and_heatmaps(self, images):
    """``(maps, heatmaps)`` from one backbone pass (eval mode)."""
    if not self.has_heatmap_head:
      raise ValueError(HEATMAP_HEAD_MISSING)
    maps, heatmaps = self.backbone(images, train=False, with_heatmaps=True)
    return [_at_least_f32(m) for m in maps], _at_least_f32(heatmaps)

  def __call__(self, images, keypoints_2d, keypoints_2d_crop, train: bool = False):
    # Crop pixels -> sampling coordinates: x / 96 - 1, y / 128 - 1 (the official
    # model divides by half the crop size, not by (size - 1) / 2).
    ref = _at_least_f32(keypoints_2d_crop)
    ref = ref / jnp.asarray([skeleton.CROP_WIDTH // 2, skeleton.CROP_HEIGHT // 2], ref.dtype) - 1
    maps = self.features(images, train) if self.lifter.use_context else []
    return self.lifter(_at_least_f32(keypoints_2d), ref, maps, train=train)


def _at_least_f32(x):
  # The lifter runs in float32 (float64 when a test asks for it), whatever
  # the backbone's compute dtype.
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# The official architecture as a model config (jax-free, for the configs).
default_model_config = defaults.default_model_config
_LIFTER_FIELDS = defaults.LIFTER_FIELDS


class ModelConfigError(ValueError):
  """A model config field that cannot work; one line naming the field."""


_DTYPES = ("float32", "bfloat16")
_BOOL_FIELDS = ("deformable", "train_backbone", "use_context")
_RATE_FIELDS = ("drop_rate", "attn_drop_rate", "drop_path_rate")
# Fields a model config may leave out (older files): they take the official
# values. The others define the weights' shapes and must be there.
_OPTIONAL_FIELDS = ("backbone_kwargs", "backbone_dtype", "lifter_dtype", "matmul_precision",
                    "dataset", "deformable", "train_backbone", "use_context", "mlp_ratio",
                    *_RATE_FIELDS)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)) and np.isfinite(value))


def check_model_config(model_config: Mapping[str, Any], where: str = "config.model") -> None:
  """Every field of a model config: known names, types, ranges, the dtypes
  and precisions allowed, `embed_dim` divisible by the attention heads.
  Raises ModelConfigError naming `where` (a config path, or a file) and the
  field, before anything is built or written."""
  cfg = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)

  def fail(name, why):
    raise ModelConfigError(f"{where}.{name}={cfg.get(name)!r} {why}")

  known = set(default_model_config().to_dict())
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ModelConfigError(f"{where} has unknown field(s) {', '.join(unknown)}; known: "
                           f"{', '.join(sorted(known))}")
  missing = [k for k in sorted(known - set(cfg)) if k not in _OPTIONAL_FIELDS]
  if missing:
    raise ModelConfigError(f"{where} lacks the field(s) {', '.join(missing)}")
  if cfg["backbone"] not in BACKBONES:
    fail("backbone", f"is not one of: {', '.join(BACKBONES)}")
  if cfg.get("dataset", "h36m") not in ("h36m", "3dhp"):
    fail("dataset", "is not one of: h36m, 3dhp")
  for name in ("backbone_dtype", "lifter_dtype"):
    if cfg.get(name, "float32") not in _DTYPES:
      fail(name, f"is not one of: {', '.join(_DTYPES)}")
  if cfg.get("matmul_precision", "highest") not in MATMUL_PRECISIONS:
    fail("matmul_precision", f"is not one of: {', '.join(MATMUL_PRECISIONS)}")
  for name in ("embed_dim", "depth", "num_heads"):
    if not _is_int(cfg[name]) or cfg[name] < 1:
      fail(name, "must be a positive integer")
  if cfg["embed_dim"] % cfg["num_heads"]:
    fail("embed_dim", f"is not divisible by num_heads={cfg['num_heads']}")
  deformable = cfg.get("deformable", True) and cfg.get("use_context", True)
  if deformable and cfg["embed_dim"] % Lifter.deformable_heads:
    fail("embed_dim", f"is not divisible by the {Lifter.deformable_heads} heads of the "
         "deformable blocks")
  if "mlp_ratio" in cfg and (not _is_real(cfg["mlp_ratio"]) or cfg["mlp_ratio"] <= 0):
    fail("mlp_ratio", "must be a positive number")
  for name in _RATE_FIELDS:
    if name in cfg and not (_is_real(cfg[name]) and 0 <= cfg[name] < 1):
      fail(name, "must be a number in [0, 1)")
  for name in _BOOL_FIELDS:
    if name in cfg and not isinstance(cfg[name], (bool, np.bool_)):
      fail(name, "must be true or false")
  kwargs = cfg.get("backbone_kwargs") or {}
  if not isinstance(kwargs, Mapping):
    fail("backbone_kwargs", "must be a mapping")
  module = hrnet.HRNet if cfg["backbone"] in HRNET_WIDTHS else cpn.CPN
  allowed = set(module.__dataclass_fields__) - {"parent", "name", "dtype", "matmul_precision"}
  extra = sorted(set(kwargs) - allowed)
  if extra:
    raise ModelConfigError(f"{where}.backbone_kwargs has unknown field(s) {', '.join(extra)} "
                           f"for {cfg['backbone']}; known: {', '.join(sorted(allowed))}")


def build_backbone(backbone: str, backbone_kwargs: Mapping[str, Any] | None = None,
                   dtype: str = "float32", matmul_precision: str = "highest") -> nn.Module:
  kwargs = dict(backbone_kwargs or {})
  kwargs["dtype"] = jnp.dtype(dtype)
  if backbone in HRNET_WIDTHS:  # convolutions only: no matmul precision to set
    kwargs.setdefault("width", HRNET_WIDTHS[backbone])
    return hrnet.HRNet(**kwargs)
  if backbone == "cpn":  # its align-corners resizes are matmuls
    return cpn.CPN(matmul_precision=matmul_precision, **kwargs)
  raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")


def build_model(model_config: Mapping[str, Any]) -> CAPF:
  """CAPF from a model config (see ``default_model_config``)."""
  cfg = dict(model_config)
  kwargs = cfg.get("backbone_kwargs") or {}
  if hasattr(kwargs, "to_dict"):
    kwargs = kwargs.to_dict()
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  # Fields a config leaves out (older model_config.json files: e.g. those
  # written before the precision policy) take the official values.
  cfg = {**default_model_config(cfg["backbone"], cfg.get("dataset", "h36m")).to_dict(), **cfg}
  backbone = (build_backbone(cfg["backbone"], kwargs, cfg["backbone_dtype"],
                             cfg["matmul_precision"])
              if cfg["use_context"] else None)
  lifter = Lifter(**{name: cfg[name] for name in _LIFTER_FIELDS},
                  deformable=cfg["deformable"], use_context=cfg["use_context"],
                  dtype=cfg["lifter_dtype"], matmul_precision=cfg["matmul_precision"])
  return CAPF(backbone=backbone, lifter=lifter, train_backbone=cfg["train_backbone"])


def dummy_inputs(batch_size: int = 1):
  """Zero inputs of the official shapes (for init / eval_shape)."""
  return (jnp.zeros((batch_size, skeleton.CROP_HEIGHT, skeleton.CROP_WIDTH, 3), jnp.float32),
          jnp.zeros((batch_size, skeleton.NUM_JOINTS, 2), jnp.float32),
          jnp.zeros((batch_size, skeleton.NUM_JOINTS, 2), jnp.float32))


def variable_shapes(model: CAPF):
  """The variables tree of ``model`` as ShapeDtypeStructs (no compute)."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs()))


def backbone_batch_norm_pairs(model: CAPF, variables=None) -> tuple[folding.ConvBN, ...]:
  """The (conv, BatchNorm) pairs of a frozen backbone; none for a trained one.

  A frozen backbone runs its BatchNorms in inference mode: per-channel affine
  maps that fold into the preceding convs (`models/folding.py`), one pass over
  every activation fewer. Found by tracing `CAPF.features` (no compute) on
  `variables` (default: the model's variable shapes).
  """
  if model.backbone is None or model.train_backbone:
    return ()
  if variables is None:
    variables = variable_shapes(model)
  return tuple(folding.find_conv_bn_pairs(model, variables, dummy_inputs(1)[0],
                                          method=CAPF.features))


def _config_to_json(model_config) -> dict:
  if hasattr(model_config, "to_dict"):
    model_config = model_config.to_dict()
  return json.loads(json.dumps(dict(model_config)))


def save_variables(directory: str, variables, model_config, *,
                   extra: Mapping[str, Any] | None = None) -> None:
  """Writes ``variables`` + ``model_config`` to ``directory`` atomically.

  The directory is assembled next to its final place and renamed into it, so
  a failure never leaves a partial output behind. An existing directory is
  refused. Directories get the user's umask (``mkdtemp`` alone would make the
  output ``drwx------``).
  """
  with fileio.new_directory(directory) as staging:
    tree = jax.tree_util.tree_map(np.asarray, dict(variables))
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(staging, VARIABLES_DIR), tree)
    record = {"model_config": _config_to_json(model_config)}
    record.update(extra or {})
    with open(os.path.join(staging, MODEL_CONFIG_FILE), "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)


def load_model_config(directory: str) -> ml_collections.ConfigDict:
  path = os.path.join(directory, MODEL_CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found; {directory} is not a converted "
                            "checkpoint directory (see weights_conversion/convert.py)")
  try:
    with open(path) as f:
      record = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(record, dict) or not isinstance(record.get("model_config"), dict):
    raise ValueError(f"{path}: no 'model_config' entry")
  check_model_config(record["model_config"], f"{path}: model_config")
  return ml_collections.ConfigDict(record["model_config"])


def load_variables(directory: str):
  """Returns ``(variables, model_config)`` from a directory ``save_variables`` wrote."""
  directory = os.path.abspath(directory)
  model_config = load_model_config(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR))
  return variables, model_config


# Official attribute names of the two halves of the torch model ``CA_PF``.
TORCH_BACKBONE_PREFIX = "backbone."
TORCH_LIFTER_PREFIX = "volume_net."


def backbone_family(backbone: str):
  """The module (hrnet or cpn) that owns a backbone's definition and keys."""
  if backbone in HRNET_WIDTHS:
    return hrnet
  return cpn


def load_torch_state_dict(state_dict: Mapping[str, Any], model: CAPF,
                          model_config: Mapping[str, Any], source: str = "FILE"):
  """Official CA-PF state dict (``module.`` prefix already stripped) -> variables.

  ``volume_net.*`` becomes the Flax ``lifter``; ``backbone.*`` keys follow the
  backbone family's rules, including the keys it knows to be unused.
  """
  def rename(key):
    if key.startswith(TORCH_LIFTER_PREFIX):
      return "lifter." + key[len(TORCH_LIFTER_PREFIX):]
    return key
  family = backbone_family(model_config["backbone"])
  ignore = [r"^backbone\." + pattern.lstrip("^") for pattern in family.TORCH_IGNORED_KEYS]
  return torch_import.convert_state_dict(
      torch_import.to_numpy(state_dict), variable_shapes(model), ignore=ignore,
      rename=rename, source=source)
