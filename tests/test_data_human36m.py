"""human36m builder from H36M-Toolbox pickles + the JPEG tree (and mp4s)."""
import os
import pickle
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_prep import h36m_metadata
from data_prep import human36m
from data_prep import records
from tests import fixtures_data

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope='module')
def manual(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('h36m_manual'))
  train, validation = fixtures_data.make_h36m_manual_dir(root)
  return root, train, validation


@pytest.fixture(scope='module')
def built_png(manual, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('h36m_png'))
  human36m.build(manual[0], data_dir=data_dir, image_format='png',
                 examples_per_shard=3, **QUIET)
  return data_dir


def test_lossless_crops_equal_official_warp(manual, built_png):
  root, train, validation = manual
  for split, labels in (('train', train), ('validation', validation)):
    got = fixtures_data.read_split('human36m', split, built_png)
    assert len(got) == len(labels)
    for ex, datum in zip(got, labels):
      frame = cv2.imread(os.path.join(root, 'images', datum['image']),
                         cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
      want = fixtures_data.official_crop_image(frame, datum['center'],
                                               datum['scale'])
      np.testing.assert_array_equal(ex['image'], want[..., ::-1])  # RGB
      assert ex['image'].std() > 10  # a real crop, not a blank one
      np.testing.assert_allclose(ex['keypoints_2d'], datum['joints_2d_cpn'],
                                 rtol=1e-6)
      np.testing.assert_allclose(ex['keypoints_2d_crop'],
                                 datum['joints_2d_cpn_crop'], rtol=1e-6)
      np.testing.assert_allclose(ex['keypoints_3d'], datum['joints_3d'],
                                 rtol=1e-6)
      assert int(ex['camera']) == datum['camera_id']
      assert int(ex['frame']) == datum['image_id']
      assert int(ex['video_id']) == datum['video_id']
      assert int(ex['subject']) in human36m.SPLITS[split]


def test_jpeg_crops_close_to_official(manual, tmp_path):
  root, train, _ = manual
  human36m.build(root, data_dir=str(tmp_path), image_format='jpeg',
                 jpeg_quality=95, **QUIET)
  got = fixtures_data.read_split('human36m', 'train', str(tmp_path))
  datum = train[0]
  frame = cv2.imread(os.path.join(root, 'images', datum['image']))
  want = fixtures_data.official_crop_image(frame, datum['center'],
                                           datum['scale'])[..., ::-1]
  diff = np.abs(got[0]['image'].astype(int) - want.astype(int))
  assert 0 < diff.mean() < 4


def _copy_manual(manual, tmp_path):
  root = str(tmp_path / 'manual')
  shutil.copytree(manual[0], root)
  return root


def _assert_fails(root, tmp_path, match):
  data_dir = str(tmp_path / 'out')
  with pytest.raises(records.DataError, match=match):
    human36m.build(root, data_dir=data_dir, **QUIET)
  assert not os.path.exists(os.path.join(data_dir, 'human36m', '1.0.0'))


def test_missing_image(manual, tmp_path):
  root = _copy_manual(manual, tmp_path)
  path = os.path.join(root, 'images', manual[2][1]['image'])
  os.remove(path)
  _assert_fails(root, tmp_path, 'missing frame .*' + os.path.basename(path))


def test_corrupt_jpeg(manual, tmp_path):
  root = _copy_manual(manual, tmp_path)
  path = os.path.join(root, 'images', manual[1][0]['image'])
  with open(path, 'wb') as f:
    f.write(b'\xff\xd8 this is not a jpeg')
  _assert_fails(root, tmp_path, os.path.basename(path) + ': truncated JPEG')


@pytest.mark.parametrize('field,value,match', [
    ('center', None, "record 1 has no field 'center'"),
    ('joints_3d', np.zeros((16, 3)), r"record 1 field 'joints_3d' has shape "
     r'\(16, 3\), want \(17, 3\)'),
    ('joints_2d_cpn', np.full((17, 2), np.nan), "record 1 field "
     "'joints_2d_cpn' has NaN"),
])
def test_bad_pickle(manual, tmp_path, field, value, match):
  root = _copy_manual(manual, tmp_path)
  train = [dict(d) for d in manual[1]]
  if value is None:
    del train[1][field]
  else:
    train[1][field] = value
  with open(os.path.join(root, 'h36m_train.pkl'), 'wb') as f:
    pickle.dump(train, f)
  _assert_fails(root, tmp_path, 'h36m_train.pkl: ' + match)


def test_subject_in_wrong_split(manual, tmp_path):
  root = _copy_manual(manual, tmp_path)
  with open(os.path.join(root, 'h36m_train.pkl'), 'wb') as f:
    pickle.dump(manual[1] + manual[2][:1], f)
  _assert_fails(root, tmp_path, 'subject S9')


def test_wrong_manual_dir_from_command_line(tmp_path):
  (tmp_path / 'empty').mkdir()
  result = subprocess.run(
      [sys.executable, '-m', 'data_prep.build', 'human36m',
       f'--manual_dir={tmp_path / "empty"}', f'--data_dir={tmp_path / "out"}'],
      capture_output=True, text=True, cwd=os.path.dirname(
          os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: --manual_dir=') and 'images/' in last
  assert not (tmp_path / 'out' / 'human36m' / '1.0.0').exists()


def test_video_route_reads_the_labelled_frames(manual, tmp_path):
  """Crops from extracted/S*/Videos/*.mp4 equal crops of the same decoded
  video frames (frame k = k-th decoded frame, as ffmpeg numbers them)."""
  root = str(tmp_path / 'manual')
  os.makedirs(root)
  for name in ('h36m_train.pkl', 'h36m_validation.pkl'):
    shutil.copy(os.path.join(manual[0], name), root)
  decoded = {}
  for datum in manual[1] + manual[2]:
    key = (datum['subject'], datum['action'], datum['subaction'],
           datum['camera_id'])
    path = os.path.join(root, 'extracted', f'S{key[0]}', 'Videos',
                        h36m_metadata.base_filename(*key) + '.mp4')
    if path in decoded:
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'mp4v'), 50,
                             (1000, 1000))
    rng = np.random.default_rng(len(decoded))
    for _ in range(3):
      writer.write(fixtures_data.textured_frame(rng))
    writer.release()
    capture = cv2.VideoCapture(path)
    frames = []
    while True:
      ok, frame = capture.read()
      if not ok:
        break
      frames.append(frame)
    assert len(frames) == 3
    decoded[path] = frames
  human36m.build(root, data_dir=str(tmp_path / 'out'), image_format='png',
                 **QUIET)
  got = fixtures_data.read_split('human36m', 'validation',
                                 str(tmp_path / 'out'))
  for ex, datum in zip(got, manual[2]):
    key = (datum['subject'], datum['action'], datum['subaction'],
           datum['camera_id'])
    path = os.path.join(root, 'extracted', f'S{key[0]}', 'Videos',
                        h36m_metadata.base_filename(*key) + '.mp4')
    frame = decoded[path][datum['image_id'] - 1]
    want = fixtures_data.official_crop_image(frame, datum['center'],
                                             datum['scale'])
    np.testing.assert_array_equal(ex['image'], want[..., ::-1])


def test_metadata_table_matches_official_xml():
  import xml.etree.ElementTree as ET  # pylint: disable=g-import-not-at-top
  root = ET.fromstring(fixtures_data.official_source(
      'H36M-Toolbox/metadata.xml'))
  rows = list(root.find('mapping'))
  subjects = [td.text for td in rows[0]][2:]
  for tr in rows[3:33]:  # actions 2..16
    action, subaction, *prefixes = [td.text for td in tr]
    for subject, prefix in zip(subjects, prefixes):
      s = int(subject[1:])
      if s in h36m_metadata.SUBJECTS:
        for cam, cam_id in enumerate(
            [e.text for e in root.find('dbcameras/index2id')]):
          assert h36m_metadata.base_filename(
              s, int(action), int(subaction), cam) == f'{prefix}.{cam_id}'
