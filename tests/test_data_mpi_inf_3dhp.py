"""mpi_inf_3dhp builder from the P-STMO npz files and the crop trees."""
import os
import shutil

import cv2
import ml_collections
import numpy as np
import pytest

from contextpose_jax import image_io
from contextpose_jax.data import pipeline
from data_prep import mpi_inf_3dhp
from data_prep import records
from tests import fixtures_data

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope='module')
def manual(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('3dhp_manual'))
  train, test = fixtures_data.make_3dhp_manual_dir(root)
  return root, train, test


@pytest.fixture(scope='module')
def built(manual, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('3dhp_built'))
  mpi_inf_3dhp.build(manual[0], data_dir=data_dir, **QUIET)
  return data_dir


def test_records(manual, built):
  root, train, test = manual
  got = fixtures_data.read_split('mpi_inf_3dhp', 'train', built)
  assert len(got) == 2 * 2 * 3
  ex = got[3]  # S1 Seq1, camera 4, frame 1
  assert ex['sequence'] == b'S1 Seq1' and int(ex['camera']) == 4
  assert int(ex['frame']) == 1 and int(ex['subject']) == 1
  assert int(ex['action']) == 1 and bool(ex['valid'])
  anim = train['S1 Seq1'][0]['4']
  np.testing.assert_allclose(ex['keypoints_2d'],
                             anim["data_2d"][0] / 2048 * 2 - 1, atol=1e-6)
  np.testing.assert_array_equal(ex['keypoints_2d_crop'],
                                anim['data_2d_crop'][0])
  np.testing.assert_allclose(ex['keypoints_3d'], anim['data_3d'][0] / 1000,
                             rtol=1e-6)
  src = os.path.join(root, 'mpi_inf_3dhp', 'images', 's_01_seq_01_ca_04',
                     's_01_seq_01_ca_04_000001.jpg')
  np.testing.assert_array_equal(ex['image'], cv2.imread(src)[..., ::-1])
  got = fixtures_data.read_split('mpi_inf_3dhp', 'test', built)
  assert [e['sequence'] for e in got] == [b'TS1'] * 3 + [b'TS5'] * 3
  assert [bool(e['valid']) for e in got] == [True, False, True] * 2
  ts5 = test['TS5']['data_2d'][2]
  np.testing.assert_allclose(got[5]['keypoints_2d'],
                             ts5 / 1920 * 2 - [1, 1080 / 1920], atol=1e-6)
  assert len({int(e['video_id']) for e in got}) == 2


def test_eval_pipeline_uses_valid_frames_and_root_14(built):
  config = ml_collections.ConfigDict({
      'data': {'name': 'mpi_inf_3dhp', 'data_dir': built, 'batch_size': 3},
      'model': {'backbone': 'hrnet_32'}})
  batches = list(pipeline.make_eval_iterator(config))
  mask = np.concatenate([b['mask'] for b in batches])
  seqs = np.concatenate([b['sequence'] for b in batches])[mask > 0]
  frames = np.concatenate([b['frame'] for b in batches])[mask > 0]
  np.testing.assert_array_equal(seqs, [1, 1, 5, 5])
  np.testing.assert_array_equal(frames, [1, 3, 1, 3])
  assert all(b['valid'][b['mask'] > 0].all() for b in batches)
  for b in batches:
    assert np.all(b['keypoints_3d'][:, 14] == 0)
    # 3DHP flip pairs: left [5,6,7,11,12,13] <-> right [2,3,4,8,9,10].
    np.testing.assert_allclose(b['keypoints_2d_crop_flip'][:, 5, 0],
                               191 - b['keypoints_2d_crop'][:, 2, 0])
  train_batch = next(pipeline.make_train_iterator(config, seed=0))
  assert np.all(train_batch['keypoints_3d'][:, 14] == 0)


def test_png_is_lossless_copy_of_source_pixels(manual, tmp_path):
  mpi_inf_3dhp.build(manual[0], data_dir=str(tmp_path), image_format='png',
                     **QUIET)
  got = fixtures_data.read_split('mpi_inf_3dhp', 'test', str(tmp_path))
  src = os.path.join(manual[0], 'mpi_inf_3dhp_test_set', 'images', 'TS5',
                     'TS5_000002.jpg')
  np.testing.assert_array_equal(got[4]['image'], cv2.imread(src)[..., ::-1])


@pytest.mark.parametrize('damage,match', [
    ('missing_image', 'missing image .*TS1_000002.jpg'),
    ('corrupt_image', 'TS1_000002.jpg: corrupt'),
    ('no_npz', 'missing .*data_test_3dhp.npz'),
    ('nan', r"TS1 camera -1 frame 2: keypoints_3d is not finite"),
    ('shape', r"data_test_3dhp.npz\['TS1'\]: data_3d has shape"),
])
def test_bad_input(manual, tmp_path, damage, match):
  root = str(tmp_path / 'manual')
  shutil.copytree(manual[0], root)
  image = os.path.join(root, 'mpi_inf_3dhp_test_set', 'images', 'TS1',
                       'TS1_000002.jpg')
  test = {k: dict(v) for k, v in manual[2].items()}
  if damage == 'missing_image':
    os.remove(image)
  elif damage == 'corrupt_image':
    with open(image, 'wb') as f:
      f.write(b'garbage')
  elif damage == 'no_npz':
    os.remove(os.path.join(root, 'data_test_3dhp.npz'))
  elif damage == 'nan':
    test['TS1']['data_3d'] = test['TS1']['data_3d'].copy()
    test['TS1']['data_3d'][1, 3] = np.nan
  elif damage == 'shape':
    test['TS1']['data_3d'] = test['TS1']['data_3d'][:, :16]
  if damage in ('nan', 'shape'):
    np.savez_compressed(os.path.join(root, 'data_test_3dhp.npz'), data=test)
  with pytest.raises(records.DataError, match=match):
    mpi_inf_3dhp.build(root, data_dir=str(tmp_path / 'out'), **QUIET)
  assert not os.path.exists(tmp_path / 'out' / 'mpi_inf_3dhp' / '1.0.0')


def test_full_size_frame_is_the_official_jpeg(manual, tmp_path):
  """A frame still at full size: the build stores what the official path
  reads after `convert_to_small.py` (run here on the same files): its JPEG
  bytes with --image_format=jpeg (whatever --jpeg_quality), their decoded
  pixels with png."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'dataset'
  shutil.copytree(manual[0], root)
  name = os.path.join('mpi_inf_3dhp', 'images', 's_01_seq_01_ca_00',
                      's_01_seq_01_ca_00_000002.jpg')
  frame = fixtures_data.textured_frame(np.random.default_rng(5), 2048, 2048)
  assert cv2.imwrite(str(root / name), frame)
  # The official script, on a copy (it rewrites the frame in place).
  work = tmp_path / 'official'
  shutil.copytree(root, work / 'dataset')
  script = fixtures_data.official_source(
      'ContextPose_mpi/dataset/data_util/convert_to_small.py')
  for old, new in (('subject_list = [1, 2, 3, 4, 5, 6, 7, 8]', 'subject_list = [1]'),
                   ('sequence_list = [1, 2]', 'sequence_list = [1]'),
                   ('camera_list = [0, 1, 2, 4, 5, 6, 7, 8]', 'camera_list = [0, 4]')):
    assert old in script
    script = script.replace(old, new)
  (work / 'convert_to_small.py').write_text(script)
  subprocess.run([sys.executable, 'convert_to_small.py'], cwd=work, check=True,
                 capture_output=True)
  official = (work / 'dataset' / name).read_bytes()
  official_pixels = cv2.imread(str(work / 'dataset' / name))
  assert official_pixels.shape == (256, 192, 3)

  def stored(image_format, **options):
    data_dir = str(tmp_path / image_format)
    mpi_inf_3dhp.build(str(root), data_dir=data_dir, image_format=image_format,
                       **options, **QUIET)
    config = ml_collections.ConfigDict({'data': {'name': 'mpi_inf_3dhp', 'data_dir': data_dir}})
    source = pipeline.data_source(config, 'train', keys=('image', 'sequence', 'camera',
                                                         'frame'))
    for i in range(len(source)):
      r = source[i]
      if (r['sequence'], int(r['camera']), int(r['frame'])) == (b'S1 Seq1', 0, 2):
        return r['image']
    raise AssertionError('frame not built')

  assert stored('jpeg', jpeg_quality=80) == official
  png = image_io.decode_image(stored('png'), 'png', bgr=True)
  np.testing.assert_array_equal(png, official_pixels)
  # The JPEG round trip matters: the bare warp (the earlier png) differs.
  helpers = {}
  exec(script.split('subject_list =')[0], helpers)  # pylint: disable=exec-used
  box = helpers['_infer_box'](manual[1]['S1 Seq1'][0]['0']['data_3d'][1],
                              helpers['mpi_inf_3dhp_cameras_intrinsic_params'][0], 14)
  trans = helpers['get_affine_transform']((0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3])),
                                          ((box[2] - box[0]) / 200.0,
                                           (box[3] - box[1]) / 200.0), 0, [192, 256])
  bare = cv2.warpAffine(frame, trans, (192, 256), flags=cv2.INTER_LINEAR)
  assert np.abs(bare.astype(int) - official_pixels).max() > 10
