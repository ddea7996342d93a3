"""synthetic_human36m: geometry against the official code, splits, determinism,
complete-or-nothing and resumable builds."""
import glob
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_data_source

from data_prep import records
from data_prep import synthetic
from tests import fixtures_data

SMALL = dict(num_train=24, num_validation=8, frames_per_video=4,
             image_format='png', examples_per_shard=10)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('synthetic'))
  synthetic.build(data_dir, log=lambda *_: None, **SMALL)
  return data_dir


def test_counts_splits_and_schema(built):
  train = fixtures_data.read_split(synthetic.NAME, 'train', built)
  val = fixtures_data.read_split(synthetic.NAME, 'validation', built)
  assert len(train) == 24 and len(val) == 8
  assert {int(e['subject']) for e in train} <= {1, 5, 6, 7, 8}
  assert {int(e['subject']) for e in val} <= {9, 11}
  e = train[0]
  assert e['image'].shape == (256, 192, 3) and e['image'].dtype == np.uint8
  assert e['keypoints_2d'].shape == (17, 2)
  assert e['keypoints_2d_crop'].shape == (17, 2)
  assert e['keypoints_3d'].shape == (17, 3)
  # Video ids are unique per (subject, action, subaction, camera) and frames
  # are 1-based within a video.
  videos = {}
  for ex in train + val:
    key = tuple(int(ex[k]) for k in ('subject', 'action', 'subaction',
                                      'camera'))
    videos.setdefault(int(ex['video_id']), set()).add(key)
  assert all(len(v) == 1 for v in videos.values())
  assert sorted(int(ex['frame']) for ex in train[:4]) == [1, 2, 3, 4]


def test_geometry_matches_official_crop_convention(built):
  transform = fixtures_data.official_transform()
  for ex in fixtures_data.read_split(synthetic.NAME, 'train', built):
    cam = int(ex['camera'])
    (fx, fy, cx, cy), (w, h) = synthetic.CAMERAS[cam]
    pose_mm = ex['keypoints_3d'].astype(np.float64) * 1000
    assert 3500 <= pose_mm[0, 2] <= 7000
    box = transform._infer_box(pose_mm, {'fx': fx, 'fy': fy, 'cx': cx,
                                         'cy': cy}, 0)
    center = (0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3]))
    scale = ((box[2] - box[0]) / 200.0, (box[3] - box[1]) / 200.0)
    trans = transform.get_affine_transform(center, scale, 0, [192, 256])
    pixels = (ex['keypoints_2d'].astype(np.float64) + [1, h / w]) * w / 2
    crop = np.stack([transform.affine_transform(p, trans) for p in pixels])
    np.testing.assert_allclose(ex['keypoints_2d_crop'], crop, atol=2e-3)
    # Detections = projection + a few pixels of noise (not the projection).
    proj = transform._weak_project(pose_mm.copy(), fx, fy, cx, cy)
    err = np.linalg.norm(pixels - proj, axis=-1)
    assert 0.3 < np.median(err) < 8.0


def test_limbs_drawn_left_blue_right_red(built):
  """The crop shows the body: pixels at unoccluded limb midpoints carry the
  side colour (left bluish, right reddish)."""
  hits = {1: 0, 2: 0}
  total = {1: 0, 2: 0}
  for ex in fixtures_data.read_split(synthetic.NAME, 'train', built):
    crop = ex['keypoints_2d_crop']
    depth = ex['keypoints_3d'][:, 2]
    for j in (2, 3, 5, 6, 12, 13, 15, 16):
      p = synthetic.PARENTS[j]
      mid = (crop[j] + crop[p]) / 2
      x, y = int(round(mid[0])), int(round(mid[1]))
      if not (0 <= x < 192 and 0 <= y < 256):
        continue
      # Only limbs nearer than every other joint's bone midpoint are surely
      # unoccluded; approximate with "nearest third of the body".
      if (depth[j] + depth[p]) / 2 > np.percentile(depth, 33):
        continue
      r, _, b = ex['image'][y, x].astype(int)
      side = synthetic.SIDE[j]
      total[side] += 1
      hits[side] += (b > r) if side == 1 else (r > b)
  assert total[1] + total[2] > 5
  assert hits[1] + hits[2] >= 0.8 * (total[1] + total[2])


def _raw_records(data_dir):
  out = {}
  for path in sorted(glob.glob(os.path.join(data_dir, synthetic.NAME, '*',
                                            '*.array_record-*'))):
    source = array_record_data_source.ArrayRecordDataSource([path])
    out[os.path.basename(path)] = [source[i] for i in range(len(source))]
  return out


def test_deterministic_rebuild(built, tmp_path):
  synthetic.build(str(tmp_path), log=lambda *_: None, num_workers=2, **SMALL)
  first, second = _raw_records(built), _raw_records(str(tmp_path))
  assert first.keys() == second.keys() and len(first) == 4
  assert first == second


_MAKE_EXAMPLES = synthetic.make_examples


def _failing_make_examples(options, task):
  if task.split == 'train' and task.index == 1:
    raise records.DataError('injected failure in shard 1')
  yield from _MAKE_EXAMPLES(options, task)


def test_interrupted_build_is_not_registered_and_resumes(tmp_path,
                                                         monkeypatch):
  data_dir = str(tmp_path)
  monkeypatch.setattr(synthetic, 'make_examples', _failing_make_examples)
  with pytest.raises(records.DataError, match='shard 1'):
    synthetic.build(data_dir, log=lambda *_: None, **SMALL)
  assert not os.path.exists(os.path.join(data_dir, synthetic.NAME, '1.0.0'))
  with pytest.raises(Exception):
    tfds.data_source(synthetic.NAME, split='train', data_dir=data_dir)
  work = os.path.join(data_dir, synthetic.NAME, '.incomplete-1.0.0')
  done = sorted(p for p in os.listdir(work) if p.endswith('-of-00003'))
  assert done == ['synthetic_human36m-train.array_record-00000-of-00003']
  first_shard = os.path.join(work, done[0])
  mtime = os.stat(first_shard).st_mtime_ns
  monkeypatch.undo()
  logs = []
  synthetic.build(data_dir, log=logs.append, **SMALL)
  assert any('resuming: 1/4' in line for line in logs)
  final = os.path.join(data_dir, synthetic.NAME, '1.0.0', done[0])
  assert os.stat(final).st_mtime_ns == mtime  # reused, not rewritten
  assert not os.path.exists(work)
  assert len(tfds.data_source(synthetic.NAME, split='train',
                              data_dir=data_dir)) == 24
  with pytest.raises(records.DataError, match='already exists'):
    synthetic.build(data_dir, log=lambda *_: None, **SMALL)


# --- issue #27: one size, and no training on another set ---------------------

def _config(data_dir, **synthetic_options):
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top
  config = synthetic_config.get_config()
  config.data.data_dir = data_dir
  config.data.synthetic = dict(
      {k: SMALL[k] for k in ('num_train', 'num_validation', 'frames_per_video')},
      seed=0, **synthetic_options)
  return config


def test_builder_default_is_the_quick_start_set():
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top
  from data_prep import build  # pylint: disable=g-import-not-at-top
  asked = synthetic_config.get_config().data.synthetic.to_dict()
  args = build.parse_args(['synthetic_human36m', '--data_dir=/tmp/x'])
  assert {k: getattr(args, k) for k in asked} == asked
  defaults = synthetic.build.__kwdefaults__
  assert {k: defaults[k] for k in asked} == asked


def test_build_if_missing_uses_only_the_set_asked_for(built):
  from data_prep import build  # pylint: disable=g-import-not-at-top
  build.build_if_missing(_config(built))  # the same set: used as it is
  final_dir = os.path.join(built, synthetic.NAME, records.VERSION)
  config = _config(built)
  config.data.synthetic.num_train = 48
  with pytest.raises(records.DataError) as e:
    build.build_if_missing(config)
  assert str(e.value) == (
      f'{final_dir} holds another synthetic set: num_train=24; the config asks for '
      f'num_train=48. Rebuild it with `capf-build-dataset synthetic_human36m '
      f'--data_dir={built} --num_train=48 --num_validation=8 --frames_per_video=4 '
      '--seed=0 --overwrite`, or choose another --config.data.data_dir')


def test_build_without_kept_options_is_checked_by_its_split_sizes(tmp_path):
  from data_prep import build  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path)
  synthetic.build(data_dir, log=lambda *_: None, **SMALL)
  final_dir = os.path.join(data_dir, synthetic.NAME, records.VERSION)
  assert records.built_options(final_dir)['num_train'] == 24
  os.remove(os.path.join(final_dir, 'build_options.json'))  # an older build
  assert records.split_sizes(final_dir) == {'train': 24, 'validation': 8}
  build.build_if_missing(_config(data_dir))
  config = _config(data_dir)
  config.data.synthetic.num_validation = 16
  with pytest.raises(records.DataError, match=r'holds another synthetic set: '
                     r'num_validation=8; the config asks for num_validation=16\.'):
    build.build_if_missing(config)
