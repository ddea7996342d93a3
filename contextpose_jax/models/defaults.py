"""The official CA-PF architecture as a model config, without jax or flax.

`configs/*.py` build their `config.model` here, so a command can load a
config (and reject a mistake in it) before the heavy imports.
`capf.default_model_config` is this function; `lifter.Lifter` takes its
defaults from `LIFTER`.
"""
from __future__ import annotations

import ml_collections

from contextpose_jax.models import BACKBONES

# `Lifter`'s defaults: the official Human3.6M lifter (ContextPose).
LIFTER = dict(embed_dim=128, depth=4, num_heads=8, mlp_ratio=2.0, qkv_bias=True,
              drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.2, deformable=True,
              use_context=True, deformable_heads=4, deformable_samples=4,
              dtype="float32", matmul_precision="highest")
# Lifter hyper-parameters a model config carries under their own names.
LIFTER_FIELDS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "drop_rate",
                 "attn_drop_rate", "drop_path_rate")
# 3DHP (ContextPose_mpi): no deformable blocks, C = 64 for W32 and 96 for W48.
_3DHP_EMBED_DIM = {"hrnet_32": 64, "hrnet_48": 96}


def default_model_config(backbone: str = "hrnet_32",
                         dataset: str = "h36m") -> ml_collections.ConfigDict:
  """The official architecture for a (backbone, dataset) pair."""
  if backbone not in BACKBONES:
    raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
  if dataset not in ("h36m", "3dhp"):
    raise ValueError(f"dataset must be 'h36m' or '3dhp', got {dataset!r}")
  if dataset == "3dhp" and backbone == "cpn":
    raise ValueError("the official MPI-INF-3DHP models use HRNet backbones only")
  c = ml_collections.ConfigDict()
  c.backbone = backbone
  c.backbone_kwargs = ml_collections.ConfigDict()  # e.g. a reduced width for tests
  c.backbone_dtype = "float32"  # compute dtype of the (frozen) backbone
  # Precision policy: the parity-exact setting. GPUs/TPUs: matmul_precision
  # 'default' + lifter_dtype 'bfloat16' (+ backbone_dtype 'bfloat16').
  c.lifter_dtype = LIFTER["dtype"]  # compute dtype; parameters always float32
  c.matmul_precision = LIFTER["matmul_precision"]  # 'highest' | 'high' | 'default'
  c.dataset = dataset  # joint conventions: 'h36m' | '3dhp'
  c.embed_dim = LIFTER["embed_dim"] if dataset == "h36m" else _3DHP_EMBED_DIM[backbone]
  c.deformable = LIFTER["deformable"] and dataset == "h36m"
  for name in LIFTER_FIELDS:
    if name not in c:
      c[name] = LIFTER[name]
  c.train_backbone = False  # official: frozen, BatchNorm in inference mode
  c.use_context = LIFTER["use_context"]  # False: the context-free baseline lifter
  return c
