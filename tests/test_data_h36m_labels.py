"""Label generation from the raw Human3.6M files vs the official script."""
import os

import numpy as np
import pytest

from data_prep import h36m_labels
from data_prep import h36m_metadata
from data_prep import human36m
from data_prep import records
from tests import fixtures_data


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('h36m_raw'))
  fixtures_data.make_h36m_raw_dir(root)
  return root


def test_generated_labels_equal_official_script(raw, tmp_path):
  train, test = fixtures_data.run_official_label_script(raw, str(tmp_path))
  ours = h36m_labels.generate(raw, frame_source='jpeg', log=lambda *_: None)
  # S9 'Directions' (subaction 2) has no CPN detections: skipped; one S1
  # frame has no image: not labelled.
  assert len(train) == 8 * 3 - 1 and len(test) == 4 * 3
  for official, table in ((train, ours['train']), (test, ours['validation'])):
    want = human36m.labels_from_records(official, 'official')
    assert len(table) == len(want)
    # float64 poses: float64 boxes, as the official script's.
    assert not want['float32_box'].any() and not table['float32_box'].any()
    for field in ('subject', 'action', 'subaction', 'camera', 'frame',
                  'video_id'):
      np.testing.assert_array_equal(table[field], want[field], err_msg=field)
    np.testing.assert_array_equal(table['center'], want['center'])
    np.testing.assert_array_equal(table['scale'], want['scale'])
    for field in ('keypoints_2d', 'keypoints_2d_crop', 'keypoints_3d'):
      np.testing.assert_allclose(table[field], want[field], rtol=1e-6,
                                 atol=1e-6, err_msg=field)


def test_build_from_raw_files(raw, tmp_path):
  human36m.build(raw, data_dir=str(tmp_path), image_format='png',
                 log=lambda *_: None)
  got = fixtures_data.read_split('human36m', 'validation', str(tmp_path))
  assert len(got) == 12 and {int(e['subject']) for e in got} == {9}


def test_missing_cdf_names_the_file(raw, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / 'raw')
  shutil.copytree(raw, root)
  path = os.path.join(root, 'extracted', 'S1', 'Poses_D2_Positions',
                      'Directions 1.54138969.cdf')
  os.remove(path)
  with pytest.raises(records.DataError, match='missing pose file .*'
                     'Poses_D2_Positions/Directions 1.54138969.cdf'):
    h36m_labels.generate(root, log=lambda *_: None)


@pytest.fixture(scope='module')
def raw32(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('h36m_raw32'))
  fixtures_data.make_h36m_raw_dir(root, seed=1, dtype=np.float32)
  return root


def _key(row):
  return tuple(int(row[k]) for k in ('subject', 'action', 'subaction', 'camera', 'frame'))


def test_float32_cdf_labels_and_crops_equal_official_script(raw32, tmp_path):
  """float32 CDF poses: the official script computes box, center and scale in
  float32, and its loader crops with those float32 values."""
  import cv2  # pylint: disable=g-import-not-at-top
  from contextpose_jax import geometry  # pylint: disable=g-import-not-at-top
  train, test = fixtures_data.run_official_label_script(raw32, str(tmp_path / 'work'))
  assert type(train[0]['center'][0]) is np.float32  # the official values' type
  ours = h36m_labels.generate(raw32, frame_source='jpeg', log=lambda *_: None)
  differs = 0
  for official, table in ((train, ours['train']), (test, ours['validation'])):
    want = human36m.labels_from_records(official, 'official')
    assert want['float32_box'].all() and table['float32_box'].all()
    for field in ('subject', 'action', 'subaction', 'camera', 'frame', 'video_id'):
      np.testing.assert_array_equal(table[field], want[field], err_msg=field)
    for field in ('center', 'scale', 'keypoints_2d_crop', 'keypoints_3d'):
      np.testing.assert_array_equal(table[field], want[field], err_msg=field)
    np.testing.assert_allclose(table['keypoints_2d'], want['keypoints_2d'], rtol=1e-6, atol=1e-6)
    # The float64 maths of the same poses (the earlier port) gives other boxes.
    for datum in official:
      pose = h36m_labels.read_cdf_pose(os.path.join(
          raw32, 'extracted', f'S{datum["subject"]}', 'Poses_D3_Positions_mono',
          h36m_metadata.base_filename(datum['subject'], datum['action'], datum['subaction'],
                                      datum['camera_id']) + '.cdf'), 3)
      assert pose.dtype == np.float32
      cam = datum['camera']
      center64, _ = geometry.box_to_center_scale(geometry.infer_box(
          pose[datum['image_id'] - 1, 0].astype(np.float64), cam['fx'], cam['fy'],
          cam['cx'], cam['cy']))
      differs += not np.array_equal(np.float32(center64), np.float32(datum['center']))
  assert differs > 0

  # The crops: what the official loader makes from the float32 labels.
  human36m.build(raw32, data_dir=str(tmp_path / 'out'), image_format='png',
                 log=lambda *_: None)
  for split, official in (('train', train), ('validation', test)):
    got = {_key(e): e['image'] for e in
           fixtures_data.read_split('human36m', split, str(tmp_path / 'out'))}
    assert len(got) == len(official)
    for datum in official:
      frame = cv2.imread(os.path.join(raw32, 'images', datum['image']))
      want = fixtures_data.official_crop_image(frame, datum['center'], datum['scale'])
      key = (datum['subject'], datum['action'], datum['subaction'], datum['camera_id'],
             datum['image_id'])
      np.testing.assert_array_equal(got[key], want[..., ::-1], err_msg=str(key))
