"""Metric functions against closed-form cases and hand-computed aggregations."""
import numpy as np
import pytest

from contextpose_jax import metrics


def _random_poses(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(scale=0.3, size=(n, 17, 3))


def _random_rotation(rng):
  q, r = np.linalg.qr(rng.normal(size=(3, 3)))
  q *= np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] *= -1
  return q


def _umeyama_reference(pred, gt):
  """Independent similarity fit (Umeyama 1991) per pose, returns aligned pred."""
  out = []
  for x, y in zip(pred, gt):  # map x (pred) onto y (gt)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    cov = yc.T @ xc / len(x)
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
      s[2, 2] = -1
    rot = u @ s @ vt
    var_x = np.mean(np.sum(xc**2, axis=1))
    c = np.trace(np.diag(d) @ s) / var_x
    out.append(c * xc @ rot.T + my)
  return np.stack(out)


def test_constant_offset_gives_p1_equal_to_offset():
  gt = _random_poses(10)
  d_mm = 37.5
  direction = np.array([2.0, -1.0, 2.0]) / 3.0  # unit vector
  pred = gt + direction * d_mm / 1000.0
  np.testing.assert_allclose(1000 * metrics.mpjpe(pred, gt), d_mm, rtol=1e-10)
  # A translation is removed by Procrustes, and constant in time: no velocity error.
  np.testing.assert_allclose(metrics.p_mpjpe(pred, gt), 0.0, atol=1e-12)
  np.testing.assert_allclose(metrics.mpjve(pred, gt), 0.0, atol=1e-12)


def test_rotation_scale_translation_gives_p2_zero():
  rng = np.random.default_rng(1)
  gt = _random_poses(8, seed=1)
  pred = np.stack([1.7 * g @ _random_rotation(rng) + rng.normal(size=3) for g in gt])
  assert metrics.mpjpe(pred, gt) > 0.1
  np.testing.assert_allclose(metrics.p_mpjpe_per_pose(pred, gt), 0.0, atol=1e-10)


def test_procrustes_matches_independent_umeyama_and_excludes_reflections():
  rng = np.random.default_rng(2)
  gt = _random_poses(16, seed=2)
  pred = gt @ _random_rotation(rng) * 0.8 + rng.normal(scale=0.05, size=gt.shape)
  pred[:4, :, 0] *= -1  # mirrored poses: best proper rotation is not exact
  aligned = metrics.procrustes_align(pred, gt)
  np.testing.assert_allclose(aligned, _umeyama_reference(pred, gt), atol=1e-9)
  # the mirrored ones keep a clear error (no reflection allowed)
  assert np.all(metrics.p_mpjpe_per_pose(pred[:4], gt[:4]) > 1e-3)


def test_procrustes_is_a_local_optimum():
  rng = np.random.default_rng(3)
  gt = _random_poses(1, seed=3)
  pred = gt + rng.normal(scale=0.05, size=gt.shape)
  aligned = metrics.procrustes_align(pred, gt)
  best = np.sum((aligned - gt)**2)
  for _ in range(50):  # any nearby similarity transform of the fit is worse
    r = _random_rotation(rng)
    small = np.eye(3) + 0.01 * (r - r.T)
    u, _, vt = np.linalg.svd(small)
    perturbed = (aligned - aligned.mean(1)) @ (u @ vt) * (1 + rng.normal(scale=0.01)) \
        + aligned.mean(1) + rng.normal(scale=0.001, size=3)
    assert np.sum((perturbed - gt)**2) >= best


def test_h36m_per_action_aggregation_by_hand():
  gt = _random_poses(8, seed=6)
  # Directions (action 2): trial 1 has 2 frames, trial 2 has 3 frames.
  # Eating (action 4): trial 1 has 3 frames, trial 2 none.
  action = np.array([2, 2, 2, 2, 2, 4, 4, 4])
  subaction = np.array([1, 1, 2, 2, 2, 1, 1, 1])
  # x-offsets in mm per frame (whole pose shifted).
  off = np.array([10., 20., 30., 30., 60., 5., 5., 5.])
  pred = gt + (off / 1000.)[:, None, None] * np.array([1., 0., 0.])
  res = metrics.evaluate_h36m(pred, gt, action, subaction)
  # P1 Directions: frame weighted over both trials = (10+20+30+30+60)/5.
  p1_dir = (10 + 20 + 30 + 30 + 60) / 5
  # MPJVE per trial: trial1 |20-10| = 10; trial2 mean(0, 30) = 15; frame weighted.
  vel_dir = (2 * 10 + 3 * 15) / 5
  a = res['per_action']
  np.testing.assert_allclose(a['Directions']['mpjpe'], p1_dir)
  np.testing.assert_allclose(a['Directions']['mpjve'], vel_dir)
  np.testing.assert_allclose(a['Eating']['mpjpe'], 5.0)
  np.testing.assert_allclose(a['Eating']['mpjve'], 0.0, atol=1e-12)
  assert a['Directions']['frames'] == 5 and a['Eating']['frames'] == 3
  # Translations vanish under Procrustes.
  np.testing.assert_allclose(a['Directions']['p_mpjpe'], 0.0, atol=1e-9)
  # Reported number: plain mean over actions (not frame weighted).
  np.testing.assert_allclose(res['mpjpe'], (p1_dir + 5.0) / 2)
  np.testing.assert_allclose(res['mpjve'], (vel_dir + 0.0) / 2)
  assert np.isnan(a['Walking']['mpjpe']) and a['Walking']['frames'] == 0


def test_h36m_trial_p2_is_frame_weighted_mean_of_per_pose():
  rng = np.random.default_rng(4)
  gt = _random_poses(6, seed=4)
  pred = gt + rng.normal(scale=0.03, size=gt.shape)
  action = np.full(6, 16)
  subaction = np.array([1, 1, 1, 1, 2, 2])
  res = metrics.evaluate_h36m(pred, gt, action, subaction)
  per_pose = metrics.p_mpjpe_per_pose(pred, gt)
  np.testing.assert_allclose(res['per_action']['WalkingTogether']['p_mpjpe'],
                             1000 * per_pose.mean())
  np.testing.assert_allclose(res['p_mpjpe'], 1000 * per_pose.mean())


def test_h36m_bad_action_raises():
  gt = np.zeros((2, 17, 3))
  with pytest.raises(ValueError, match='out of range'):
    metrics.evaluate_h36m(gt, gt, np.array([1, 2]), np.array([1, 1]))


def test_3dhp_mpjpe_pck_auc_closed_form():
  n = 4
  gt = _random_poses(n, seed=5)
  gt -= gt[:, 14:15]
  pred = gt.copy()
  pred[:, 14] = [0.5, 0.5, 0.5]  # ignored: the root of the prediction is zeroed
  e = 0.042  # 42 mm on every PCK joint
  pred[:, :14, 1] += e
  pred[:, 15:, 2] += 0.4  # 400 mm on spine + head: in MPJPE, not in PCK
  seq = np.array(['TS1', 'TS1', 'TS5', 'TS5'])
  res = metrics.evaluate_3dhp(pred, gt, seq, valid=np.array([1, 1, 1, 0]))
  np.testing.assert_allclose(res['mpjpe'], (14 * 42 + 2 * 400) / 17)
  np.testing.assert_allclose(res['pck'], 100.0)
  # thresholds 0:5:150 with 42 < t: 45..150 -> 22 of 31
  np.testing.assert_allclose(res['auc'], 100 * 22 / 31)
  assert res['num_frames'] == 3
  assert res['per_sequence']['TS1']['frames'] == 2
  assert res['per_sequence']['TS5']['frames'] == 1


def test_3dhp_pck_counts_strictly_below_threshold_per_joint():
  gt = np.zeros((2, 17, 3))
  pred = np.zeros((2, 17, 3))
  # frame 0: 7 joints at 100 mm, 7 at 200 mm; frame 1: all at 149.9 mm
  pred[0, :7, 0] = 0.1
  pred[0, 7:14, 0] = 0.2
  pred[1, :14, 0] = 0.1499
  res = metrics.evaluate_3dhp(pred, gt, np.array([0, 1]))
  assert list(res['per_sequence']) == ['TS1', 'TS2']
  np.testing.assert_allclose(res['per_sequence']['TS1']['pck'], 50.0)
  np.testing.assert_allclose(res['per_sequence']['TS2']['pck'], 100.0)
  np.testing.assert_allclose(res['pck'], 75.0)
  # AUC TS1: 100 mm joints below t for t=105..150 (10 of 31), 200 mm never.
  np.testing.assert_allclose(res['per_sequence']['TS1']['auc'], 100 * 0.5 * 10 / 31)
  # Overall pools frames (not a mean of the sequence numbers).
  expected = (7 * 100 + 7 * 200 + 14 * 149.9) / (2 * 17)
  np.testing.assert_allclose(res['mpjpe'], expected)


def test_write_json_is_valid_and_maps_nan_to_null(tmp_path):
  import json
  path = tmp_path / 'sub' / 'eval.json'
  metrics.write_json(path, {'mpjpe': 1.5, 'per_action': {'A': {'mpjpe': float('nan')}}})
  assert json.loads(path.read_text()) == {'mpjpe': 1.5, 'per_action': {'A': {'mpjpe': None}}}
