r"""Converts official PyTorch checkpoints into Flax variable directories.

    python -m weights_conversion.convert --kind=capf --backbone=hrnet_32 \
        --input=best_epoch_hrnet_32.bin --output=converted/capf_hrnet_32

Kinds and the files they take:
  hrnet_32, hrnet_48  COCO backbones: a plain state dict
                      (pose_hrnet_w{32,48}_256x192.pth; ``final_layer.*`` ignored).
  cpn                 COCO CPN50: ``{'state_dict': {'module.*': ...}}``
                      (CPN50_256x192.pth.tar; its unused heads ignored).
  capf                released CA-PF models. ``--dataset=h36m``:
                      ``{'model': {'module.backbone.*', 'module.volume_net.*'}}``
                      (best_epoch_{hrnet_32,hrnet_48,cpn}.bin); ``--dataset=3dhp``:
                      a plain state dict with the ``module.`` prefix
                      (HRNet_32_64_no_refine_24_3214.pth, HRNet_48_96_no_refine_45_3125.pth).

The output directory (``contextpose_jax.api.Predictor.load`` reads it) holds
an orbax checkpoint and ``model_config.json``. Conversion is strict and
all-or-nothing: any missing, unexpected or mis-shaped key exits non-zero with
one message and leaves no output directory.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Any, Mapping

KINDS = ("capf", "hrnet_32", "hrnet_48", "cpn")


class InputError(ValueError):
  """The input file is not what ``--kind`` says it is."""


def _read_torch_file(path: str) -> Any:
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"{path}: cannot be read as a PyTorch checkpoint "
                     f"(truncated or corrupt?): {type(e).__name__}: {str(e).splitlines()[0]}") from e


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and obj and all(
      isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items())


def _describe(obj) -> str:
  if isinstance(obj, Mapping):
    keys = list(obj.keys())
    return f"a dict with keys {keys[:4]}{' ...' if len(keys) > 4 else ''}"
  return f"a {type(obj).__name__}"


def _strip_module(state_dict, path):
  if not all(k.startswith("module.") for k in state_dict):
    raise InputError(f"{path}: expected every key to start with 'module.' "
                     f"(a DataParallel checkpoint); found e.g. {next(iter(state_dict))!r}")
  return {k[len("module."):]: v for k, v in state_dict.items()}


def extract_state_dict(obj, kind: str, dataset: str, path: str) -> dict[str, Any]:
  """The model weights in ``obj``, in the layout ``kind`` expects, prefixes stripped."""
  if kind in ("hrnet_32", "hrnet_48"):
    if not _is_state_dict(obj) or "conv1.weight" not in obj:
      raise InputError(f"{path}: expected a COCO HRNet state dict (keys like 'conv1.weight', "
                       f"'stage2.0.branches.0.0.conv1.weight'); found {_describe(obj)}")
    return dict(obj)
  if kind == "cpn":
    if not isinstance(obj, Mapping) or not _is_state_dict(obj.get("state_dict")):
      raise InputError(f"{path}: expected a CPN50 checkpoint, a dict with 'state_dict' holding "
                       f"'module.resnet.*' keys; found {_describe(obj)}")
    return _strip_module(obj["state_dict"], path)
  # capf
  if dataset == "h36m":
    if not isinstance(obj, Mapping) or not _is_state_dict(obj.get("model")):
      hint = (" -- a COCO backbone file? use --kind=hrnet_32/hrnet_48/cpn"
              if _is_state_dict(obj) or "state_dict" in obj else "")
      raise InputError(f"{path}: expected a CA-PF checkpoint, a dict with 'model' holding "
                       f"'module.backbone.*' and 'module.volume_net.*' keys; found "
                       f"{_describe(obj)}{hint}")
    state_dict = _strip_module(obj["model"], path)
  else:
    if not _is_state_dict(obj):
      raise InputError(f"{path}: expected a CA-PF MPI-INF-3DHP state dict with "
                       f"'module.backbone.*' / 'module.volume_net.*' keys; found {_describe(obj)}")
    state_dict = _strip_module(obj, path)
  if not any(k.startswith("volume_net.") for k in state_dict):
    raise InputError(f"{path}: no 'module.volume_net.*' (lifter) keys: not a CA-PF checkpoint"
                     " -- a COCO backbone file? use --kind=hrnet_32/hrnet_48/cpn")
  return state_dict


def convert(kind: str, input_path: str, output_dir: str, *, backbone: str | None = None,
            dataset: str = "h36m") -> None:
  """Reads ``input_path`` and writes the Flax variables to ``output_dir``."""
  # Imported here so that `--help` and argument errors are instant.
  from contextpose_jax.models import capf  # pylint: disable=g-import-not-at-top

  if kind not in KINDS:
    raise InputError(f"--kind must be one of {KINDS}, got {kind!r}")
  if os.path.exists(output_dir):
    raise InputError(f"{output_dir}: already exists; choose a new --output directory")
  if kind != "capf":
    if backbone not in (None, kind):
      raise InputError(f"--backbone={backbone} contradicts --kind={kind}")
    backbone = kind
  backbone = backbone or "hrnet_32"
  model_config = capf.default_model_config(backbone, dataset)

  obj = _read_torch_file(input_path)
  state_dict = extract_state_dict(obj, kind, dataset, input_path)
  model = capf.build_model(model_config)
  if kind == "capf":
    variables = capf.load_torch_state_dict(state_dict, model, model_config, source=input_path)
  else:
    family = capf.backbone_family(backbone)
    backbone_variables = family.load_torch_state_dict(state_dict, model.backbone,
                                                      source=input_path)
    variables = {col: {"backbone": tree} for col, tree in backbone_variables.items()}

  with open(input_path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  capf.save_variables(output_dir, variables, model_config, extra={
      "converted_from": {"file": os.path.basename(input_path), "sha256": digest,
                         "kind": kind}})


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m weights_conversion.convert",
      description="Convert official PyTorch CA-PF / COCO backbone checkpoints to Flax.")
  parser.add_argument("--kind", required=True, choices=KINDS)
  parser.add_argument("--backbone", choices=("hrnet_32", "hrnet_48", "cpn"),
                      help="backbone of a --kind=capf checkpoint (default hrnet_32)")
  parser.add_argument("--dataset", choices=("h36m", "3dhp"), default="h36m",
                      help="which CA-PF model a --kind=capf file holds")
  parser.add_argument("--input", required=True, help="the PyTorch file")
  parser.add_argument("--output", required=True, help="new directory to write")
  args = parser.parse_args(argv)
  from contextpose_jax.models.torch_import import ConversionError  # pylint: disable=g-import-not-at-top
  try:
    convert(args.kind, args.input, args.output, backbone=args.backbone, dataset=args.dataset)
  except (InputError, ConversionError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
