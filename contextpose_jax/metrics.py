"""Evaluation metrics, aggregated exactly as the official CA-PF code does.

Human3.6M (`ContextPose/mvn/datasets/human36m.py`, `evaluate_using_pred`, and
`ContextPose/mvn/models/loss.py`): P1 (MPJPE), P2 (MPJPE after a similarity
Procrustes alignment) and MPJVE per action trial, merged frame-weighted into 15
actions; the reported number is the plain mean over the 15 actions.

MPI-INF-3DHP (`ContextPose_mpi/run_3dhp.py` and the MATLAB scripts in
`ContextPose_mpi/3dhp_test/test_util/`): MPJPE, PCK@150 mm and AUC over the
thresholds 0:5:150 mm, on valid frames, per test sequence TS1-TS6 and overall.

Inputs are numpy arrays in metres; every reported number is in millimetres
(PCK and AUC in percent).
"""
from __future__ import annotations

import json
from typing import Mapping, Sequence

import numpy as np

from contextpose_jax import fileio
from contextpose_jax import skeleton

# The 15 Human3.6M actions in the order of the official `retval['action_names']`
# (action ids 2..16; each id has two trials, subaction 1 and 2).
H36M_ACTIONS = (
    'Directions', 'Discussion', 'Eating', 'Greeting', 'Phoning', 'Posing',
    'Purchases', 'Sitting', 'SittingDown', 'Smoking', 'TakingPhoto', 'Waiting',
    'Walking', 'WalkingDog', 'WalkingTogether')

# 3DHP: PCK/AUC joint groups of `mpii_get_pck_auc_joint_groups.m` (1-based
# indices 1..14 there): head, neck, shoulders, elbows, wrists, hips, knees,
# ankles. Pelvis (14), spine (15) and head (16) are in MPJPE but not in PCK.
MPI_PCK_JOINTS = tuple(range(14))
MPI_ROOT = skeleton.ROOT_JOINT["3dhp"]
MPI_PCK_THRESHOLD_MM = 150.0
MPI_AUC_THRESHOLDS_MM = np.arange(0.0, 151.0, 5.0)  # 0:5:150, 31 values
MPI_SEQUENCES = ('TS1', 'TS2', 'TS3', 'TS4', 'TS5', 'TS6')


# ----------------------------------------------------------------------------
# Per-pose error functions (`mvn/models/loss.py`).
# ----------------------------------------------------------------------------


def _as_poses(x) -> np.ndarray:
  """(N, [1,] J, 3) -> float64 (N, J, 3)."""
  x = np.asarray(x, dtype=np.float64)
  if x.ndim == 4:
    x = x.reshape(x.shape[0], x.shape[-2], x.shape[-1])
  if x.ndim != 3:
    raise ValueError(f'poses must be (N, J, 3) or (N, 1, J, 3); got {x.shape}')
  return x


def mpjpe(pred, gt) -> float:
  """Mean per-joint position error (same units as the inputs)."""
  pred, gt = _as_poses(pred), _as_poses(gt)
  _check_same_shape(pred, gt)
  return float(np.mean(np.linalg.norm(pred - gt, axis=-1)))


def procrustes_align(pred, gt) -> np.ndarray:
  """Aligns each pred pose to gt with the best similarity transform.

  Scale, rotation (reflections excluded) and translation, as `P_MPJPE` in the
  official `loss.py`; poses (N, J, 3), returns the aligned predictions.
  """
  pred, gt = _as_poses(pred), _as_poses(gt)
  _check_same_shape(pred, gt)
  mu_gt = gt.mean(axis=1, keepdims=True)
  mu_pred = pred.mean(axis=1, keepdims=True)
  x0 = gt - mu_gt
  y0 = pred - mu_pred
  norm_x = np.sqrt(np.sum(x0**2, axis=(1, 2), keepdims=True))
  norm_y = np.sqrt(np.sum(y0**2, axis=(1, 2), keepdims=True))
  x0 = x0 / norm_x
  y0 = y0 / norm_y
  h = np.einsum('nji,njk->nik', x0, y0)
  u, s, vt = np.linalg.svd(h)
  v = np.swapaxes(vt, 1, 2)
  rot = v @ np.swapaxes(u, 1, 2)
  # Flip the last singular direction where the optimum would be a reflection.
  sign = np.sign(np.linalg.det(rot))
  v[:, :, -1] *= sign[:, None]
  s[:, -1] *= sign
  rot = v @ np.swapaxes(u, 1, 2)
  scale = s.sum(axis=1)[:, None, None] * norm_x / norm_y
  trans = mu_gt - scale * (mu_pred @ rot)
  return scale * (pred @ rot) + trans


def p_mpjpe_per_pose(pred, gt) -> np.ndarray:
  """(N,) MPJPE of each pose after similarity Procrustes alignment."""
  gt = _as_poses(gt)
  aligned = procrustes_align(pred, gt)
  return np.mean(np.linalg.norm(aligned - gt, axis=-1), axis=-1)


def p_mpjpe(pred, gt) -> float:
  """Protocol 2: MPJPE after similarity Procrustes alignment."""
  return float(np.mean(p_mpjpe_per_pose(pred, gt)))


def mpjve(pred, gt) -> float:
  """Mean per-joint velocity error over consecutive poses of the sequence."""
  pred, gt = _as_poses(pred), _as_poses(gt)
  _check_same_shape(pred, gt)
  return float(np.mean(np.linalg.norm(
      np.diff(pred, axis=0) - np.diff(gt, axis=0), axis=-1)))


def _check_same_shape(a, b):
  if a.shape != b.shape:
    raise ValueError(f'prediction shape {a.shape} != ground truth {b.shape}')


# ----------------------------------------------------------------------------
# Human3.6M.
# ----------------------------------------------------------------------------


def h36m_action_index(action, subaction) -> np.ndarray:
  """Official trial index (action - 2) * 2 + (subaction - 1), in [0, 30)."""
  return (np.asarray(action) - 2) * 2 + (np.asarray(subaction) - 1)


def evaluate_h36m(pred, gt, action, subaction) -> dict:
  """Human3.6M P1 / P2 / MPJVE per action and their mean, in mm.

  `pred`, `gt`: (N, 17, 3) (or (N, 1, 17, 3)) root-relative metres, in
  DATASET order (subject, action, subaction, camera, frame): MPJVE takes the
  velocity between consecutive samples of one action trial in that order,
  across subjects and cameras, exactly like the official code. Neither pose is
  re-centred: the root error of the prediction counts in P1, as officially.

  Aggregation (official `evaluate_using_pred`): for each of the 30 trials,
  error * frame_count; the two trials of an action are summed and divided by
  their total frame count; the reported number is the mean over the 15
  actions. Deviation, only where the official code would produce NaN: a trial
  without frames contributes nothing and an action without frames is left out
  of the mean (its entry is NaN).
  """
  pred, gt = _as_poses(pred), _as_poses(gt)
  _check_same_shape(pred, gt)
  trial = h36m_action_index(action, subaction)
  if trial.shape != (pred.shape[0],):
    raise ValueError(f'action/subaction must be ({pred.shape[0]},); got {trial.shape}')
  bad = (trial < 0) | (trial >= 2 * len(H36M_ACTIONS))
  if np.any(bad):
    raise ValueError(f'action/subaction out of range at index {int(np.argmax(bad))}')

  sums = {name: np.zeros(4) for name in H36M_ACTIONS}  # p1, p2, vel, count
  for t in range(2 * len(H36M_ACTIONS)):
    sel = trial == t
    n = int(np.count_nonzero(sel))
    if n == 0:
      continue
    p, g = pred[sel], gt[sel]
    vel = mpjve(p, g) if n > 1 else 0.0
    sums[H36M_ACTIONS[t // 2]] += np.array(
        [n * mpjpe(p, g), n * p_mpjpe(p, g), n * vel, n])

  per_action = {}
  for name, (p1, p2, vel, n) in sums.items():
    if n == 0:
      per_action[name] = {'mpjpe': float('nan'), 'p_mpjpe': float('nan'),
                          'mpjve': float('nan'), 'frames': 0}
    else:
      per_action[name] = {'mpjpe': 1000.0 * p1 / n, 'p_mpjpe': 1000.0 * p2 / n,
                          'mpjve': 1000.0 * vel / n, 'frames': int(n)}
  present = [v for v in per_action.values() if v['frames'] > 0]
  mean = lambda k: float(np.mean([v[k] for v in present])) if present else float('nan')
  return {'mpjpe': mean('mpjpe'), 'p_mpjpe': mean('p_mpjpe'),
          'mpjve': mean('mpjve'), 'num_frames': int(pred.shape[0]),
          'per_action': per_action}


def format_h36m_table(result: Mapping) -> str:
  lines = [f'{"action":<16}{"frames":>8}{"P1":>9}{"P2":>9}{"MPJVE":>9}']
  for name, v in result['per_action'].items():
    lines.append(f'{name:<16}{v["frames"]:>8d}{v["mpjpe"]:>9.2f}'
                 f'{v["p_mpjpe"]:>9.2f}{v["mpjve"]:>9.2f}')
  lines.append(f'{"Average":<16}{result["num_frames"]:>8d}{result["mpjpe"]:>9.2f}'
               f'{result["p_mpjpe"]:>9.2f}{result["mpjve"]:>9.2f}')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# MPI-INF-3DHP.
# ----------------------------------------------------------------------------


def mpi_joint_errors_mm(pred, gt) -> np.ndarray:
  """(N, 17) per-joint errors in mm, both poses relative to joint 14.

  The official loop zeroes joint 14 of the prediction (`pred_out[:, :, 14] = 0`)
  and the MATLAB script subtracts joint 14 from the ground truth.
  """
  pred, gt = _as_poses(pred), _as_poses(gt)
  _check_same_shape(pred, gt)
  pred = pred.copy()
  pred[:, MPI_ROOT] = 0.0
  gt = gt - gt[:, MPI_ROOT:MPI_ROOT + 1]
  return 1000.0 * np.linalg.norm(pred - gt, axis=-1)


def mpi_scores(errors_mm) -> dict:
  """MPJPE / PCK / AUC of (N, 17) joint errors, as `mpii_compute_3d_pck.m`.

  MPJPE is the mean over all 17 joints. PCK counts the 14 group joints with
  error strictly below 150 mm; the MATLAB group weighting by group size makes
  it the plain fraction over those joints. AUC = mean PCK over 0:5:150 mm.
  """
  errors_mm = np.asarray(errors_mm, dtype=np.float64)
  e = errors_mm[:, MPI_PCK_JOINTS]
  curve = np.array([np.mean(e < t) for t in MPI_AUC_THRESHOLDS_MM])
  return {'mpjpe': float(np.mean(errors_mm)),
          'pck': float(100.0 * np.mean(e < MPI_PCK_THRESHOLD_MM)),
          'auc': float(100.0 * np.mean(curve)),
          'frames': int(errors_mm.shape[0])}


def evaluate_3dhp(pred, gt, sequence, valid=None,
                  sequence_names: Sequence[str] | None = None) -> dict:
  """MPI-INF-3DHP metrics on valid frames, per sequence and overall.

  `sequence`: (N,) sequence names ('TS1'...) or integer ids (named by
  `sequence_names[id]`, default 'TS{id+1}'); `valid`: (N,) bool (default all).
  Overall numbers pool the frames of every sequence (`mpii_evaluate_errors.m`).
  """
  errors = mpi_joint_errors_mm(pred, gt)
  sequence = np.asarray(sequence)
  if sequence.shape != (errors.shape[0],):
    raise ValueError(f'sequence must be ({errors.shape[0]},); got {sequence.shape}')
  if sequence.dtype.kind in 'iu':
    names = sequence_names or [f'TS{i + 1}' for i in range(int(sequence.max()) + 1)]
    sequence = np.asarray([names[i] for i in sequence])
  sequence = np.asarray([s.decode() if isinstance(s, bytes) else str(s) for s in sequence])
  keep = np.ones(errors.shape[0], bool) if valid is None else np.asarray(valid, bool)
  errors, sequence = errors[keep], sequence[keep]
  if errors.shape[0] == 0:
    raise ValueError('no valid frames to evaluate')
  ordered = [s for s in MPI_SEQUENCES if s in set(sequence)]
  ordered += sorted(set(sequence) - set(ordered))
  per_sequence = {s: mpi_scores(errors[sequence == s]) for s in ordered}
  overall = mpi_scores(errors)
  return {'mpjpe': overall['mpjpe'], 'pck': overall['pck'], 'auc': overall['auc'],
          'num_frames': overall['frames'], 'per_sequence': per_sequence}


def format_3dhp_table(result: Mapping) -> str:
  lines = [f'{"sequence":<10}{"frames":>8}{"MPJPE":>9}{"PCK":>8}{"AUC":>8}']
  for name, v in result['per_sequence'].items():
    lines.append(f'{name:<10}{v["frames"]:>8d}{v["mpjpe"]:>9.2f}{v["pck"]:>8.2f}{v["auc"]:>8.2f}')
  lines.append(f'{"All":<10}{result["num_frames"]:>8d}{result["mpjpe"]:>9.2f}'
               f'{result["pck"]:>8.2f}{result["auc"]:>8.2f}')
  return '\n'.join(lines)


def format_table(result: Mapping) -> str:
  if 'per_action' in result:
    return format_h36m_table(result)
  return format_3dhp_table(result)


def write_json(path, result: Mapping):
  """Writes `result` atomically (temp file + rename); NaN becomes null."""
  def clean(x):
    if isinstance(x, Mapping):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, float) and not np.isfinite(x):
      return None
    return x

  fileio.write_text_atomic(path, json.dumps(clean(result), indent=2))
