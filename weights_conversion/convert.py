r"""Converts official PyTorch checkpoints into Flax variable directories.

    capf-convert --kind=capf --backbone=hrnet_32 \
        --input=best_epoch_hrnet_32.bin --output=ckpt/capf_hrnet_32

Kinds and the files they take:
  hrnet_32, hrnet_48  COCO backbones: a plain state dict
                      (pose_hrnet_w{32,48}_256x192.pth); every key is loaded,
                      the heatmap head ``final_layer.*`` included.
  cpn                 COCO CPN50: ``{'state_dict': {'module.*': ...}}``
                      (CPN50_256x192.pth.tar); every key is loaded except
                      GlobalNet's intermediate-supervision heads
                      ``global_net.predict.*`` (the heatmap head is RefineNet's
                      ``final_predict``, kept).
  capf                released CA-PF models. ``--dataset=h36m``:
                      ``{'model': {'module.backbone.*', 'module.volume_net.*'}}``
                      (best_epoch_{hrnet_32,hrnet_48,cpn}.bin); ``--dataset=3dhp``:
                      a plain state dict with the ``module.`` prefix
                      (HRNet_32_64_no_refine_24_3214.pth, HRNet_48_96_no_refine_45_3125.pth).

A COCO conversion keeps the heatmap head (``model_config.backbone_kwargs.
heatmap_head = true``), so ``Predictor.heatmaps`` / ``detect_2d`` work on it;
CA-PF checkpoints have no head.

The output directory (``contextpose_jax.api.Predictor.load`` reads it) holds
an orbax checkpoint and ``model_config.json``; it is created with the user's
umask. Conversion is strict and all-or-nothing: a missing, unexpected or
mis-shaped key, a non-finite (NaN/inf) value, an empty or unreadable file, an
output that exists or cannot be written (checked before any work) -- every
failure exits 1 with ONE line on stderr and leaves no output behind.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from typing import Any, Mapping

from absl import flags
import numpy as np

from contextpose_jax import cli
from contextpose_jax import host_devices
from contextpose_jax import paths
from contextpose_jax.models import BACKBONES

KINDS = ("capf", *BACKBONES)


class InputError(ValueError):
  """The input file is not what ``--kind`` says it is."""


def _one_line(text: str) -> str:
  """The first non-empty line of ``text`` (exception texts can be many)."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[0] if lines else ""


def _error_text(e: BaseException) -> str:
  detail = _one_line(e)
  return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


def _read_torch_file(path: str) -> Any:
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  if os.path.getsize(path) == 0:
    raise InputError(f"{path}: empty file (0 bytes), not a PyTorch checkpoint")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"{path}: cannot be read as a PyTorch checkpoint "
                     f"(truncated or corrupt?): {_error_text(e)}") from e


def check_output_writable(output_dir: str) -> None:
  """Fails unless ``output_dir`` can be created: it must not exist, and its
  nearest existing ancestor must be a writable directory. Probed by creating
  (and removing) a directory there, so read-only mounts and ACLs count too."""
  output_dir = os.path.abspath(output_dir)
  if os.path.lexists(output_dir):
    raise InputError(f"{output_dir}: already exists; choose a new --output directory")
  ancestor = os.path.dirname(output_dir)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise InputError(f"{output_dir}: cannot create the output: {ancestor} is not a directory")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".convert-probe-", dir=ancestor))
  except OSError as e:
    raise InputError(f"{output_dir}: cannot create the output: {ancestor} is not "
                     f"writable ({_error_text(e)})") from e


def check_finite(state_dict: Mapping[str, Any], path: str) -> None:
  """Refuses NaN / inf in any floating tensor (weights and BatchNorm stats)."""
  bad = []
  for key, value in state_dict.items():
    array = value.detach().cpu().numpy() if hasattr(value, "detach") else value
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
      bad.append(key)
  if bad:
    raise InputError(f"{path}: non-finite values (NaN or inf) in {len(bad)} tensor(s): "
                     + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else "")
                     + "; refusing to convert a broken checkpoint")


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
      if _is_state_dict(obj) and any(str(k).startswith("module.volume_net.") for k in obj):
        # The released 3DHP models are plain state dicts, the H36M ones are not.
        hint = (" -- it looks like an MPI-INF-3DHP CA-PF model (a plain state dict of "
                "'module.volume_net.*' keys): pass --dataset=3dhp")
      elif _is_state_dict(obj) or (isinstance(obj, Mapping) and "state_dict" in obj):
        hint = " -- a COCO backbone file? use --kind=hrnet_32/hrnet_48/cpn"
      else:
        hint = ""
      raise InputError(f"{path}: expected a CA-PF checkpoint, a dict with 'model' holding "
                       f"'module.backbone.*' and 'module.volume_net.*' keys; found "
                       f"{_describe(obj)}{hint}")
    state_dict = _strip_module(obj["model"], path)
  else:
    if not _is_state_dict(obj):
      hint = (" -- it looks like a Human3.6M CA-PF checkpoint: drop --dataset=3dhp"
              if isinstance(obj, Mapping) and _is_state_dict(obj.get("model")) else "")
      raise InputError(f"{path}: expected a CA-PF MPI-INF-3DHP state dict with "
                       f"'module.backbone.*' / 'module.volume_net.*' keys; found "
                       f"{_describe(obj)}{hint}")
    state_dict = _strip_module(obj, path)
  if not any(k.startswith("volume_net.") for k in state_dict):
    raise InputError(f"{path}: no 'module.volume_net.*' (lifter) keys: not a CA-PF checkpoint"
                     " -- a COCO backbone file? use --kind=hrnet_32/hrnet_48/cpn")
  return state_dict


def convert(kind: str, input_path: str, output_dir: str, *, backbone: str | None = None,
            dataset: str = "h36m") -> None:
  """Reads ``input_path`` and writes the Flax variables to ``output_dir``."""

  if kind not in KINDS:
    raise InputError(f"--kind must be one of {KINDS}, got {kind!r}")
  if kind != "capf":
    if backbone not in (None, kind):
      raise InputError(f"--backbone={backbone} contradicts --kind={kind}")
    backbone = kind
  backbone = backbone or "hrnet_32"
  from contextpose_jax.models import capf  # pylint: disable=g-import-not-at-top  # after the flags
  model_config = capf.default_model_config(backbone, dataset)
  if kind != "capf":
    # A COCO file keeps its heatmap head (Predictor.heatmaps / detect_2d).
    model_config.backbone_kwargs.heatmap_head = True
  # Before reading anything: a bad --output must not cost a whole conversion.
  if not os.path.isfile(input_path):
    raise InputError(f"{input_path}: no such file")
  check_output_writable(output_dir)

  obj = _read_torch_file(input_path)
  state_dict = extract_state_dict(obj, kind, dataset, input_path)
  check_finite(state_dict, input_path)
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


_FLAGS = flags.FlagValues()
flags.DEFINE_enum("kind", None, KINDS, "what the file holds (see above)", flag_values=_FLAGS)
flags.DEFINE_enum("backbone", None, BACKBONES,
                  "backbone of a --kind=capf checkpoint (default hrnet_32)", flag_values=_FLAGS)
flags.DEFINE_enum("dataset", "h36m", ("h36m", "3dhp"),
                  "which CA-PF model a --kind=capf file holds", flag_values=_FLAGS)
paths.define_path("input", None, "the PyTorch file", flag_values=_FLAGS)
paths.define_path("output", None, "new directory to write", flag_values=_FLAGS)
for _name in ("kind", "input", "output"):
  flags.mark_flag_as_required(_name, flag_values=_FLAGS)


def main(argv=None) -> int:
  cli.parse(_FLAGS, argv, __doc__)
  args = _FLAGS
  # jax / flax only once the command line is valid (--help stays instant).
  from contextpose_jax.models.torch_import import ConversionError  # pylint: disable=g-import-not-at-top
  host_devices.skip_absent_backends()
  try:
    convert(args.kind, args.input, args.output, backbone=args.backbone, dataset=args.dataset)
  except (InputError, ConversionError, FileExistsError, ValueError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 1
  except OSError as e:  # e.g. the disk filled up while writing: nothing is left behind
    print(f"error: {args.output}: conversion failed, nothing written: {_error_text(e)}",
          file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"error: interrupted; {args.output} not written", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    # Anything else is a bug or an input nobody foresaw: still one line.
    print(f"error: {args.input}: conversion failed: {_error_text(e)}", file=sys.stderr)
    return 1
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
