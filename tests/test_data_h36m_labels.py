"""Label generation from the raw Human3.6M files vs the official script."""
import os

import numpy as np
import pytest

from data_prep import h36m_labels
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
