"""Converter fault rows of issue #12: each failure is exit code 1, exactly one
line on stderr, and nothing left behind (no output, no staging or probe
directory); a good conversion creates its directories with the user's umask.

Files are written in the released formats by the torch reference modules:
the full-size W32 default-initialized (fast to build; conversion needs the real
shapes), reduced models where a failure comes before any shape check.
"""
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from contextpose_jax import fileio
from contextpose_jax.models import capf
from torch_reference import capf as ref_capf
from weights_conversion import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_HRNET = dict(width=8, stage_modules=(1, 2, 2), num_blocks=1, stem_channels=16,
                  layer1_blocks=1)


@pytest.fixture(scope="module")
def coco_w32(tmp_path_factory):
  """pose_hrnet_w32_256x192.pth in the released layout (torch's default init)."""
  path = tmp_path_factory.mktemp("coco") / "pose_hrnet_w32_256x192.pth"
  torch.manual_seed(0)
  ref_capf.save_coco_hrnet(ref_capf.build_backbone("hrnet_32"), path)
  return path


def _fail(capsys, *args, code=1):
  """Runs the CLI in-process; returns its one stderr line."""
  assert convert.main(list(args)) == code
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1, captured.err
  assert captured.out == ""
  return lines[0]


def _listing(root):
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, dirs, files in os.walk(root) for n in dirs + files)


def test_empty_checkpoint_file(tmp_path, capsys):
  empty = tmp_path / "pose_hrnet_w32_256x192.pth"
  empty.write_bytes(b"")
  before = _listing(tmp_path)
  line = _fail(capsys, "--kind=hrnet_32", f"--input={empty}", f"--output={tmp_path / 'out'}")
  assert line == f"error: {empty}: empty file (0 bytes), not a PyTorch checkpoint"
  assert _listing(tmp_path) == before


def test_empty_checkpoint_file_subprocess(tmp_path):
  """The real process: exit code 1, one stderr line, nothing on stdout."""
  empty = tmp_path / "best_epoch_hrnet_32.bin"
  empty.write_bytes(b"")
  proc = subprocess.run([sys.executable, "-m", "weights_conversion.convert", "--kind=capf",
                         f"--input={empty}", f"--output={tmp_path / 'out'}"],
                        cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [
      f"error: {empty}: empty file (0 bytes), not a PyTorch checkpoint"]
  assert proc.stdout == ""
  assert os.listdir(tmp_path) == [empty.name]


def test_garbage_file_is_one_line(tmp_path, capsys):
  garbage = tmp_path / "CPN50_256x192.pth.tar"
  garbage.write_bytes(b"\x00not a zip and not a pickle\n" * 10)
  line = _fail(capsys, "--kind=cpn", f"--input={garbage}", f"--output={tmp_path / 'out'}")
  assert line.startswith(f"error: {garbage}: cannot be read as a PyTorch checkpoint "
                         "(truncated or corrupt?): ")
  assert not (tmp_path / "out").exists()


@pytest.fixture
def no_reading(monkeypatch):
  """Proves that an output check comes before the checkpoint is read."""
  def refuse(path):
    raise AssertionError(f"{path} was read before the output was checked")
  monkeypatch.setattr(convert, "_read_torch_file", refuse)


def test_output_parent_is_a_file(coco_w32, tmp_path, capsys, no_reading):
  parent = tmp_path / "not_a_dir"
  parent.write_text("x")
  before = _listing(tmp_path)
  out = parent / "sub" / "converted"
  line = _fail(capsys, "--kind=hrnet_32", f"--input={coco_w32}", f"--output={out}")
  assert line == f"error: {out}: cannot create the output: {parent} is not a directory"
  assert _listing(tmp_path) == before


def test_output_exists(coco_w32, tmp_path, capsys, no_reading):
  out = tmp_path / "converted"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  line = _fail(capsys, "--kind=hrnet_32", f"--input={coco_w32}", f"--output={out}")
  assert line == f"error: {out}: already exists; choose a new --output directory"
  assert os.listdir(out) == ["keep.txt"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories (see the file-as-parent case)")
def test_output_parent_not_writable(coco_w32, tmp_path, capsys, no_reading):
  parent = tmp_path / "read_only"
  parent.mkdir()
  parent.chmod(0o555)
  try:
    out = parent / "converted"
    line = _fail(capsys, "--kind=hrnet_32", f"--input={coco_w32}", f"--output={out}")
    assert line.startswith(f"error: {out}: cannot create the output: {parent} is not "
                           "writable (PermissionError")
    assert os.listdir(parent) == []
  finally:
    parent.chmod(0o755)


def _with_non_finite(src, dst, edits):
  state = torch.load(src, weights_only=True)
  for key, value in edits.items():
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
  torch.save(state, dst)


def test_nan_and_inf_weights_are_refused(coco_w32, tmp_path, capsys):
  bad = tmp_path / "nan.pth"
  _with_non_finite(coco_w32, bad, {"stage3.1.branches.2.0.conv1.weight": float("nan"),
                                   "layer1.0.bn2.running_var": float("nan"),
                                   "final_layer.bias": float("inf")})
  before = _listing(tmp_path)
  line = _fail(capsys, "--kind=hrnet_32", f"--input={bad}", f"--output={tmp_path / 'out'}")
  assert line == (f"error: {bad}: non-finite values (NaN or inf) in 3 tensor(s): "
                  "layer1.0.bn2.running_var, stage3.1.branches.2.0.conv1.weight, "
                  "final_layer.bias; refusing to convert a broken checkpoint")
  assert _listing(tmp_path) == before


def test_nan_batch_norm_mean_in_capf_file(tmp_path, capsys):
  model = ref_capf.CAPF("hrnet_32", "3dhp", backbone_kwargs=TINY_HRNET)
  with torch.no_grad():
    model.backbone.bn1.running_mean[3] = float("nan")
  path = tmp_path / "HRNet_32_64_no_refine_24_3214.pth"
  ref_capf.save_capf_3dhp(model, path)
  line = _fail(capsys, "--kind=capf", "--dataset=3dhp", f"--input={path}",
               f"--output={tmp_path / 'out'}")
  assert line == (f"error: {path}: non-finite values (NaN or inf) in 1 tensor(s): "
                  "backbone.bn1.running_mean; refusing to convert a broken checkpoint")
  assert not (tmp_path / "out").exists()


def test_3dhp_file_without_dataset_flag_gets_the_right_hint(tmp_path, capsys):
  model = ref_capf.CAPF("hrnet_32", "3dhp", backbone_kwargs=TINY_HRNET)
  path = tmp_path / "HRNet_32_64_no_refine_24_3214.pth"
  ref_capf.save_capf_3dhp(model, path)
  line = _fail(capsys, "--kind=capf", f"--input={path}", f"--output={tmp_path / 'out'}")
  assert line.endswith(" -- it looks like an MPI-INF-3DHP CA-PF model (a plain state dict of "
                       "'module.volume_net.*' keys): pass --dataset=3dhp")
  assert "COCO" not in line
  assert not (tmp_path / "out").exists()

  # And the other way round: a Human3.6M file given --dataset=3dhp.
  h36m = tmp_path / "best_epoch_hrnet_32.bin"
  ref_capf.save_capf_h36m(ref_capf.CAPF("hrnet_32", "h36m", backbone_kwargs=TINY_HRNET), h36m)
  line = _fail(capsys, "--kind=capf", "--dataset=3dhp", f"--input={h36m}",
               f"--output={tmp_path / 'out'}")
  assert line.endswith(" -- it looks like a Human3.6M CA-PF checkpoint: drop --dataset=3dhp")


def test_coco_file_as_capf_keeps_its_hint(coco_w32, tmp_path, capsys):
  line = _fail(capsys, "--kind=capf", f"--input={coco_w32}", f"--output={tmp_path / 'out'}")
  assert line.endswith(" -- a COCO backbone file? use --kind=hrnet_32/hrnet_48/cpn")


def test_other_failures_are_one_line(coco_w32, tmp_path, capsys, monkeypatch):
  out = tmp_path / "out"
  line = _fail(capsys, "--kind=hrnet_32", f"--input={tmp_path / 'nope.pth'}", f"--output={out}")
  assert line == f"error: {tmp_path / 'nope.pth'}: no such file"
  line = _fail(capsys, "--kind=hrnet_32", "--backbone=cpn", f"--input={coco_w32}",
               f"--output={out}")
  assert line == "error: --backbone=cpn contradicts --kind=hrnet_32"
  # W32 file as W48: strict, every mis-shaped key in one line.
  line = _fail(capsys, "--kind=hrnet_48", f"--input={coco_w32}", f"--output={out}")
  assert line.startswith(f"error: {coco_w32}: does not match the model -- mis-shaped")
  # Usage errors: one line too (argparse's exit code 2).
  with pytest.raises(SystemExit) as e:
    convert.main(["--kind=resnet", f"--input={coco_w32}", f"--output={out}"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: flag --kind=resnet: value should be one of")
  assert len(err.strip().splitlines()) == 1

  # The disk fills up while the output is written: one line, nothing left.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  def disk_full(self, *args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", disk_full)
  line = _fail(capsys, "--kind=hrnet_32", f"--input={coco_w32}", f"--output={out}")
  assert line == (f"error: {out}: conversion failed, nothing written: "
                  "OSError: [Errno 28] No space left on device")
  assert os.listdir(tmp_path) == []
  assert sorted(os.listdir(coco_w32.parent)) == [coco_w32.name]

  # An error nobody foresaw (a bug): still one line.
  def boom(*args, **kwargs):
    raise KeyError("unforeseen")
  monkeypatch.setattr(capf, "save_variables", boom)
  line = _fail(capsys, "--kind=hrnet_32", f"--input={coco_w32}", f"--output={out}")
  assert line == f"error: {coco_w32}: conversion failed: KeyError: 'unforeseen'"
  assert os.listdir(tmp_path) == []


def _modes(root):
  return {os.path.relpath(d, root): stat.S_IMODE(os.stat(d).st_mode)
          for d, _, _ in os.walk(root)}


@pytest.fixture
def umask():
  old = os.umask(0o022)
  yield lambda mask: os.umask(mask)
  os.umask(old)


def test_output_directories_follow_umask(coco_w32, tmp_path, capsys, umask):
  umask(0o022)
  out = tmp_path / "converted"
  assert convert.main(["--kind=hrnet_32", f"--input={coco_w32}", f"--output={out}"]) == 0
  assert capsys.readouterr().err == ""
  modes = _modes(out)
  assert len(modes) > 2 and set(modes.values()) == {0o755}, modes
  assert sorted(os.listdir(tmp_path)) == ["converted"]  # no staging or probe left

  umask(0o027)  # not a constant 0o755: save_variables reads the umask
  other = tmp_path / "other"
  capf.save_variables(str(other), {"params": {"a": np.zeros(3, np.float32)}}, {"x": 1})
  assert set(_modes(other).values()) == {0o750}
  assert fileio.current_umask() == 0o027
