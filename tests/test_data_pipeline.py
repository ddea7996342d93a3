"""grain pipeline: normalisation, flips, determinism, sharding, eval coverage."""
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from contextpose_jax import skeleton
from contextpose_jax.data import pipeline
from contextpose_jax.data import transforms
from data_prep import synthetic
from tests import fixtures_data

N_TRAIN, N_VAL = 32, 10


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('pipeline'))
  synthetic.build(d, num_train=N_TRAIN, num_validation=N_VAL,
                  frames_per_video=8, image_format='png',
                  examples_per_shard=16, log=lambda *_: None)
  return d


@pytest.fixture(scope='module')
def stored(data_dir):
  return {split: fixtures_data.read_split(synthetic.NAME, split, data_dir)
          for split in ('train', 'validation')}


def make_config(data_dir, **data):
  base = dict(name=synthetic.NAME, data_dir=data_dir, batch_size=8,
              num_workers=2)
  base.update(data)
  return ml_collections.ConfigDict({'data': base,
                                    'model': {'backbone': 'hrnet_32'}})


def find(stored_split, kp2d):
  """Index of the stored example with these keypoints_2d, and if flipped."""
  for i, ex in enumerate(stored_split):
    if np.array_equal(ex['keypoints_2d'], kp2d):
      return i, False
    if np.array_equal(skeleton.flip_keypoints_2d(ex['keypoints_2d'], 'h36m'),
                      kp2d):
      return i, True
  raise AssertionError('batch example not found in the stored records')


def test_normalize_image_matches_formula():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(2, 256, 192, 3), dtype=np.uint8)
  x = img.astype(np.float64)
  hrnet = (x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  cpn = x / 255 - np.array([122.7717, 115.9465, 102.9801]) / 255
  for backbone, want in (('hrnet_32', hrnet), ('hrnet_48', hrnet),
                         ('cpn', cpn)):
    got = transforms.normalize_image(img, backbone)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  flipped = transforms.normalize_images(img, 'cpn', flips=[True, False])
  np.testing.assert_allclose(flipped[0], cpn[0, :, ::-1], atol=1e-6)
  np.testing.assert_allclose(flipped[1], cpn[1], atol=1e-6)


def test_flip_batch_hand_computed_and_involution():
  rng = np.random.default_rng(1)
  batch = {'image': rng.integers(0, 255, (2, 256, 192, 3), dtype=np.uint8),
           'keypoints_2d': rng.normal(size=(2, 17, 2)).astype(np.float32),
           'keypoints_2d_crop': rng.uniform(0, 191, (2, 17, 2)).astype(
               np.float32),
           'keypoints_3d': rng.normal(size=(2, 17, 3)).astype(np.float32)}
  out = transforms.flip_batch(batch, np.array([True, False]), 'h36m')
  # Right hip (1) <-> left hip (4): the flipped left hip is the mirrored
  # right hip; crop x -> 191 - x; 3D x negated; y, z untouched.
  np.testing.assert_allclose(out['keypoints_2d_crop'][0, 4],
                             [191 - batch['keypoints_2d_crop'][0, 1, 0],
                              batch['keypoints_2d_crop'][0, 1, 1]])
  np.testing.assert_allclose(out['keypoints_2d'][0, 16],
                             [-batch['keypoints_2d'][0, 13, 0],
                              batch['keypoints_2d'][0, 13, 1]])
  np.testing.assert_allclose(out['keypoints_3d'][0, 0],
                             batch['keypoints_3d'][0, 0] * [-1, 1, 1])
  np.testing.assert_allclose(out['keypoints_3d'][0, 11],
                             batch['keypoints_3d'][0, 14] * [-1, 1, 1])
  np.testing.assert_array_equal(out['image'][0, 10, 0],
                                batch['image'][0, 10, 191])
  for key in batch:  # the unflipped example is untouched
    np.testing.assert_array_equal(out[key][1], batch[key][1])
  twice = transforms.flip_batch(out, np.array([True, False]), 'h36m')
  for key in batch:
    np.testing.assert_allclose(twice[key], batch[key], atol=1e-5)


def test_train_batches_match_records(data_dir, stored):
  config = make_config(data_dir, flip_augmentation=False)
  it = pipeline.make_train_iterator(config, seed=3)
  seen = []
  for _ in range(N_TRAIN // 8):  # one epoch
    batch = next(it)
    assert batch['image'].shape == (8, 256, 192, 3)
    assert batch['image'].dtype == np.float32
    for b in range(8):
      i, flipped = find(stored['train'], batch['keypoints_2d'][b])
      assert not flipped
      ex = stored['train'][i]
      seen.append(i)
      np.testing.assert_allclose(
          batch['image'][b], transforms.normalize_image(ex['image'],
                                                        'hrnet_32'), atol=1e-6)
      np.testing.assert_array_equal(batch['keypoints_2d_crop'][b],
                                    ex['keypoints_2d_crop'])
      want = ex['keypoints_3d'] - ex['keypoints_3d'][:1]
      np.testing.assert_allclose(batch['keypoints_3d'][b], want, atol=1e-6)
      assert np.all(batch['keypoints_3d'][b, 0] == 0)
  assert sorted(seen) == list(range(N_TRAIN))  # an epoch is a permutation
  assert seen != sorted(seen)  # and it is shuffled


def _flip_pattern(batches, stored_split):
  return [[find(stored_split, b['keypoints_2d'][k])[1]
           for k in range(len(b['keypoints_2d']))] for b in batches]


def test_flip_per_batch_and_per_example(data_dir, stored):
  batches = [next(it) for it in [pipeline.make_train_iterator(
      make_config(data_dir), seed=0)] for _ in range(12)]
  pattern = _flip_pattern(batches, stored['train'])
  assert all(len(set(p)) == 1 for p in pattern)  # decided per batch
  assert {p[0] for p in pattern} == {True, False}
  # A flipped example is the flip of its record, image included.
  b = next(k for k, p in enumerate(pattern) if p[0])
  i, _ = find(stored['train'], batches[b]['keypoints_2d'][0])
  ex = stored['train'][i]
  np.testing.assert_allclose(
      batches[b]['image'][0],
      transforms.normalize_image(ex['image'][:, ::-1], 'hrnet_32'), atol=1e-6)
  np.testing.assert_allclose(batches[b]['keypoints_2d_crop'][0],
                             skeleton.flip_keypoints_crop(
                                 ex['keypoints_2d_crop'], 'h36m'), atol=1e-5)
  root_rel = ex['keypoints_3d'] - ex['keypoints_3d'][:1]
  np.testing.assert_allclose(batches[b]['keypoints_3d'][0],
                             skeleton.flip_pose_3d(root_rel, 'h36m'),
                             atol=1e-6)
  it = pipeline.make_train_iterator(
      make_config(data_dir, flip_per_example=True), seed=0)
  pattern = _flip_pattern([next(it) for _ in range(4)], stored['train'])
  assert any(len(set(p)) == 2 for p in pattern)


def test_restart_at_step_reproduces_batches(data_dir):
  config = make_config(data_dir, num_workers=3)
  full = pipeline.make_train_iterator(config, seed=7)
  want = [next(full) for _ in range(7)][4:]  # crosses an epoch boundary
  resumed = pipeline.make_train_iterator(make_config(data_dir, num_workers=1),
                                         seed=7, start_step=4)
  for expected in want:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_hosts_read_disjoint_shards_with_same_flips(data_dir, stored,
                                                    monkeypatch):
  config = make_config(data_dir, batch_size=8)
  per_host = []
  for host in range(2):
    monkeypatch.setattr(pipeline, '_process_info', lambda h=host: (h, 2))
    it = pipeline.make_train_iterator(config, seed=5)
    per_host.append([next(it) for _ in range(N_TRAIN // 2 // 4)])
  ids = []
  for host, batches in enumerate(per_host):
    assert batches[0]['image'].shape[0] == 4  # local part of the global batch
    ids.append({find(stored['train'], b['keypoints_2d'][k])[0]
                for b in batches for k in range(4)})
    assert len(ids[-1]) == N_TRAIN // 2  # each host: its half, once per epoch
  assert not ids[0] & ids[1]
  flips = [_flip_pattern(b, stored['train']) for b in per_host]
  assert [p[0] for p in flips[0]] == [p[0] for p in flips[1]]


def test_eval_covers_every_example_once_with_flip_pairs(data_dir, stored):
  config = make_config(data_dir, batch_size=4)
  iterator = pipeline.make_eval_iterator(config, 'validation')
  assert len(iterator) == 3  # known up front: the evaluation bar's total
  batches = list(iterator)
  assert len(batches) == 3 == pipeline.num_eval_batches(config)
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [1] * N_VAL + [0] * 2)
  frames = np.concatenate([b['frame'] for b in batches])[:N_VAL]
  np.testing.assert_array_equal(frames, [int(e['frame']) for e in
                                         stored['validation']])
  for b in batches:
    for key in ('subject', 'action', 'subaction', 'camera', 'video_id'):
      assert b[key].dtype == np.int32
    np.testing.assert_allclose(b['image_flip'], b['image'][:, :, ::-1],
                               atol=1e-6)
    np.testing.assert_allclose(
        b['keypoints_2d_flip'],
        skeleton.flip_keypoints_2d(b['keypoints_2d'], 'h36m'))
    np.testing.assert_allclose(
        b['keypoints_2d_crop_flip'],
        skeleton.flip_keypoints_crop(b['keypoints_2d_crop'], 'h36m'))
  ex = stored['validation'][5]
  b = batches[1]
  np.testing.assert_allclose(b['image'][1], transforms.normalize_image(
      ex['image'], 'hrnet_32'), atol=1e-6)
  np.testing.assert_allclose(b['keypoints_3d'][1], ex['keypoints_3d'] -
                             ex['keypoints_3d'][:1], atol=1e-6)
  assert int(b['subject'][1]) == int(ex['subject'])


def test_eval_multi_host_union(data_dir, monkeypatch):
  config = make_config(data_dir, batch_size=4)
  frames = []
  for host in range(2):
    monkeypatch.setattr(pipeline, '_process_info', lambda h=host: (h, 2))
    batches = list(pipeline.make_eval_iterator(config, 'validation'))
    assert len(batches) == 3 and batches[0]['image'].shape[0] == 2
    frames.append([(int(v), int(f)) for b in batches for v, f, m in
                   zip(b['video_id'], b['frame'], b['mask']) if m])
  assert len(frames[0]) + len(frames[1]) == N_VAL
  assert not set(frames[0]) & set(frames[1])


def test_record_source_matches_tfds(data_dir):
  config = make_config(data_dir)
  ours = pipeline.data_source(config, 'train')
  theirs = tfds.data_source(synthetic.NAME, split='train', data_dir=data_dir,
                            decoders={'image': tfds.decode.SkipDecoding()})
  for i in (0, 7, N_TRAIN - 1):
    a, b = ours[i], theirs[i]
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
      if np.ndim(b[key]):  # tfds gives Python ints for scalars; we int32
        assert a[key].dtype == b[key].dtype, key
  some = pipeline.data_source(config, 'train', keys=('image', 'keypoints_3d'))
  assert some[7].keys() == {'image', 'keypoints_3d'}
  np.testing.assert_array_equal(some[7]['keypoints_3d'], theirs[7]['keypoints_3d'])
  with pytest.raises(KeyError, match='keypoints_4d'):
    pipeline.data_source(config, 'train', keys=('keypoints_4d',))


def test_missing_dataset_is_a_clear_error(tmp_path):
  config = make_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='capf-build-dataset'):
    pipeline.make_train_iterator(config, seed=0)


def test_buffer_pool_never_overwrites_arrays_in_use():
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(3, 256, 192, 3), dtype=np.uint8)
  pool = transforms.BufferPool(max_size=2)
  first = transforms.normalize_images(images, 'cpn', pool=pool)
  kept = first.copy()
  view = first[1:]  # a view keeps its base in use too
  del first
  second = transforms.normalize_images(images[::-1], 'cpn', pool=pool)
  np.testing.assert_array_equal(view, kept[1:])
  assert second.base is not view.base
  address = second.__array_interface__['data'][0]
  del second
  third = transforms.normalize_images(images, 'cpn', pool=pool)
  assert third.__array_interface__['data'][0] == address  # recycled
  np.testing.assert_array_equal(third, kept)
