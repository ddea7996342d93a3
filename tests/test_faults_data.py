"""Issue #12, data rows: hostile and broken inputs, concurrent and killed
builds. Each test checks the exact failure, the one-line message naming the
file or field, and that nothing is left behind (no registered partial
dataset, no stray process, no file written by a payload)."""
import functools
import glob
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from contextpose_jax import image_io
from contextpose_jax import locking
from contextpose_jax.data import pipeline
from data_prep import h36m_labels
from data_prep import human36m
from data_prep import mpi_inf_3dhp
from data_prep import records
from data_prep import safe_pickle
from data_prep import synthetic
from tests import fixtures_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda *_: None)


def run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def assert_one_line_error(result, *fragments):
  """Exit 1, no traceback, last stderr line `error: ...` with `fragments`."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), last
  for fragment in fragments:
    assert fragment in last, (fragment, last)
  return last


def not_registered(data_dir, name):
  return not os.path.exists(os.path.join(data_dir, name, records.VERSION))


# ---------------------------------------------------------------------------
# 1. Pickle payloads are refused; the real formats still load.


class _Payload:
  """Unpickling runs `command` (what a hostile label file would do)."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return (self.function, self.args)


def _payloads(marker):
  return {
      'os.system': _Payload(os.system, f'touch {marker}'),
      'subprocess.call': _Payload(subprocess.call, ['touch', marker]),
      'builtins.eval': _Payload(eval, f'open({marker!r}, "w").close()'),
  }


@pytest.fixture(scope='module')
def h36m_manual(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('h36m_manual'))
  fixtures_data.make_h36m_manual_dir(root)
  return root


@pytest.mark.parametrize('kind', ['os.system', 'subprocess.call',
                                  'builtins.eval'])
def test_payload_in_toolbox_pickle_is_refused(h36m_manual, tmp_path, kind):
  root = str(tmp_path / 'manual')
  shutil.copytree(h36m_manual, root)
  marker = str(tmp_path / 'MARKER')
  with open(os.path.join(root, 'h36m_train.pkl'), 'rb') as f:
    labels = pickle.load(f)
  labels[1]['center'] = _payloads(marker)[kind]
  with open(os.path.join(root, 'h36m_train.pkl'), 'wb') as f:
    pickle.dump(labels, f)
  data_dir = str(tmp_path / 'out')
  with pytest.raises(records.DataError,
                     match=r'h36m_train.pkl: refused to load the global'):
    human36m.build(root, data_dir=data_dir, **QUIET)
  assert not os.path.exists(marker)
  assert not_registered(data_dir, 'human36m')


def test_payload_pickle_from_the_command_line(h36m_manual, tmp_path):
  root = str(tmp_path / 'manual')
  shutil.copytree(h36m_manual, root)
  marker = str(tmp_path / 'MARKER')
  with open(os.path.join(root, 'h36m_validation.pkl'), 'wb') as f:
    pickle.dump([_Payload(os.system, f'touch {marker}')], f)
  result = run_cli('-m', 'data_prep.build', 'human36m', f'--manual_dir={root}',
                   f'--data_dir={tmp_path / "out"}', '--num_workers=1')
  assert_one_line_error(result, 'h36m_validation.pkl: refused to load the '
                        'global posix.system')
  assert not os.path.exists(marker)
  assert not_registered(str(tmp_path / 'out'), 'human36m')


def test_payload_in_camera_pickle_is_refused(tmp_path):
  marker = str(tmp_path / 'MARKER')
  cameras = {(1, 1): [np.eye(3), np.zeros(3), np.ones(2),
                      _Payload(os.system, f'touch {marker}')]}
  with open(tmp_path / 'camera_data.pkl', 'wb') as f:
    pickle.dump(cameras, f)
  with pytest.raises(records.DataError, match=r'camera_data.pkl: refused to '
                     r'load the global posix.system'):
    h36m_labels.load_cameras(str(tmp_path))
  assert not os.path.exists(marker)


def test_real_camera_pickle_loads():
  """H36M-Toolbox's own camera_data.pkl (numpy 1.x pickle) still loads."""
  data = fixtures_data.official_bytes('H36M-Toolbox/camera_data.pkl')
  restricted = safe_pickle.loads_from(io.BytesIO(data), 'camera_data.pkl')
  reference = pickle.loads(data)
  assert restricted.keys() == reference.keys()
  for key in reference:
    for got, want in zip(restricted[key], reference[key]):
      if isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
      else:
        assert got == want


def test_payload_in_cpn_npz_is_refused(tmp_path):
  marker = str(tmp_path / 'MARKER')
  positions = {'S1': {'Directions 1': [_Payload(os.system,
                                                f'touch {marker}')] * 4}}
  np.savez_compressed(tmp_path / h36m_labels.CPN_FILE,
                      positions_2d=positions, metadata={})
  with pytest.raises(records.DataError, match=(
      h36m_labels.CPN_FILE + r"\['positions_2d'\]: refused to load the "
      'global posix.system')):
    h36m_labels.load_cpn(str(tmp_path))
  assert not os.path.exists(marker)


def test_real_cpn_npz_loads(tmp_path):
  positions = {'S1': {'Directions 1': [np.zeros((5, 17, 2), np.float32)] * 4}}
  np.savez_compressed(tmp_path / h36m_labels.CPN_FILE, positions_2d=positions,
                      metadata={'layout_name': 'h36m'})
  got = h36m_labels.load_cpn(str(tmp_path))
  assert got.keys() == {'S1'}
  np.testing.assert_array_equal(got['S1']['Directions 1'][3],
                                np.zeros((5, 17, 2), np.float32))


@pytest.mark.parametrize('npz', [mpi_inf_3dhp.TRAIN_NPZ, mpi_inf_3dhp.TEST_NPZ])
def test_payload_in_pstmo_npz_is_refused(tmp_path, npz):
  root = str(tmp_path / 'manual')
  train, test = fixtures_data.make_3dhp_manual_dir(root)
  marker = str(tmp_path / 'MARKER')
  data = train if npz == mpi_inf_3dhp.TRAIN_NPZ else test
  first = next(iter(data))
  data[first] = _Payload(os.system, f'touch {marker}')
  np.savez_compressed(os.path.join(root, npz), data=data)
  data_dir = str(tmp_path / 'out')
  with pytest.raises(records.DataError, match=(
      npz + r"\['data'\]: refused to load the global posix.system")):
    mpi_inf_3dhp.build(root, data_dir=data_dir, **QUIET)
  assert not os.path.exists(marker)
  assert not_registered(data_dir, mpi_inf_3dhp.NAME)


def test_restricted_unpickler_keeps_numpy_and_builtins():
  value = {'a': np.arange(6.0).reshape(2, 3).T, 'b': np.float32(2),
           'c': np.int64(3), 'd': (1, 2.5, 'x', None, True), 'e': {1, 2},
           'f': frozenset([3]), 'g': 1 + 2j, 'h': b'\x00\xff',
           'i': np.array([{'k': np.ones(2)}, None], dtype=object),
           'j': np.zeros(3, [('x', np.float32), ('y', np.int16, (2,))])}
  for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
    got = safe_pickle.loads_from(io.BytesIO(pickle.dumps(value, protocol)),
                                 'x')
    assert got.keys() == value.keys()
    np.testing.assert_array_equal(got['a'], value['a'])
    assert got['a'].flags.f_contiguous
    assert type(got['b']) is np.float32 and got['c'] == 3
    assert got['d'] == value['d'] and got['e'] == {1, 2}
    assert got['f'] == frozenset([3]) and got['g'] == 1 + 2j
    assert got['h'] == b'\x00\xff'
    np.testing.assert_array_equal(got['i'][0]['k'], np.ones(2))
    assert got['j'].dtype == value['j'].dtype


# ---------------------------------------------------------------------------
# 2. Strict image decoding.


def _encoded(ext, **kw):
  rng = np.random.default_rng(0)
  image = fixtures_data.textured_frame(rng, 256, 192)
  params = ([cv2.IMWRITE_JPEG_PROGRESSIVE, int(kw.get('progressive', 0))]
            if ext == '.jpg' else [])
  return image, cv2.imencode(ext, image, params)[1].tobytes()


@pytest.mark.parametrize('ext,progressive', [('.jpg', 0), ('.jpg', 1),
                                             ('.png', 0)])
def test_truncated_images_are_errors(tmp_path, ext, progressive):
  _, data = _encoded(ext, progressive=progressive)
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  path = str(tmp_path / f'frame{ext}')
  with open(path, 'wb') as f:
    f.write(data)
  np.testing.assert_array_equal(image_io.read_image(path, bgr=True), image)
  np.testing.assert_array_equal(image_io.read_image(path), image[..., ::-1])
  want = ('truncated JPEG (no end-of-image marker)' if ext == '.jpg'
          else 'truncated PNG (no IEND chunk)')
  for cut in (len(data) // 2, len(data) - 1, len(data) - 2, 200, 3):
    with open(path, 'wb') as f:
      f.write(data[:cut])
    with pytest.raises(image_io.ImageError) as e:
      image_io.read_image(path)
    assert str(e.value) in (f'{path}: {want}',
                            f'{path}: corrupt or unsupported image (cannot '
                            'be decoded)')
  # Bytes after the end (padding, camera trailers) are not truncation.
  got = image_io.decode_image(data + b'\x00' * 7 + b'trailer\xff\xd8', 'x',
                              bgr=True)
  np.testing.assert_array_equal(got, image)


def test_corrupt_empty_and_missing_images(tmp_path):
  assert issubclass(image_io.ImageError, ValueError)
  for name, data, want in (
      ('empty.jpg', b'', 'empty image file'),
      ('text.jpg', b'not an image at all', 'corrupt or unsupported image'),
      ('soi_eoi.jpg', b'\xff\xd8\xff\xd9', 'corrupt or unsupported image')):
    path = str(tmp_path / name)
    with open(path, 'wb') as f:
      f.write(data)
    with pytest.raises(image_io.ImageError, match='^' + path + ': ' + want):
      image_io.read_image(path)
  with pytest.raises(image_io.ImageError, match='missing.jpg: cannot read'):
    image_io.read_image(str(tmp_path / 'missing.jpg'))


def test_half_jpeg_in_h36m_tree_fails_the_build(h36m_manual, tmp_path):
  root = str(tmp_path / 'manual')
  shutil.copytree(h36m_manual, root)
  path = sorted(glob.glob(os.path.join(root, 'images', '*', '*.jpg')))[3]
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  data_dir = str(tmp_path / 'out')
  result = run_cli('-m', 'data_prep.build', 'human36m', f'--manual_dir={root}',
                   f'--data_dir={data_dir}', '--num_workers=1')
  assert_one_line_error(
      result, f'{path}: truncated JPEG (no end-of-image marker)')
  assert not_registered(data_dir, 'human36m')
  assert not os.path.exists(os.path.join(data_dir, 'human36m', '.lock'))


def test_truncated_3dhp_crop_fails_the_build(tmp_path):
  root = str(tmp_path / 'manual')
  fixtures_data.make_3dhp_manual_dir(root)
  path = os.path.join(root, 'mpi_inf_3dhp_test_set', 'images', 'TS5',
                      'TS5_000002.jpg')
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:-300])
  data_dir = str(tmp_path / 'out')
  with pytest.raises(records.DataError, match='^' + path + ': truncated JPEG'):
    mpi_inf_3dhp.build(root, data_dir=data_dir, **QUIET)
  assert not_registered(data_dir, mpi_inf_3dhp.NAME)


# ---------------------------------------------------------------------------
# Helpers for the process tests: a build whose shards take a while.

SLOW = 'synthetic_human36m'  # a known name, so the CLI can collide with it


def _slow_examples(task):
  delay = float(os.environ.get('FAULTS_SLEEP', '0'))
  for i in task.items:
    time.sleep(delay)
    crop = np.full(records.IMAGE_SHAPE, int(i) % 256, np.uint8)
    example = {'image': records.encode_crop(crop, 'png', 95),
               'keypoints_2d': np.full((17, 2), i, np.float32),
               'keypoints_2d_crop': np.full((17, 2), i, np.float32),
               'keypoints_3d': np.full((17, 3), i, np.float32)}
    for key in records.INT_FIELDS:
      example[key] = int(i)
    yield example


def slow_build(data_dir, num_workers, n=32, per_shard=4):
  """Run in a subprocess: `python -c` ... (see _start_slow_build)."""
  shards = (records.split_into_shards('train', np.arange(n), per_shard)
            + records.split_into_shards('validation', np.arange(per_shard),
                                        per_shard))
  records.build(name=SLOW, data_dir=data_dir,
                feature_spec=records.features('png'), shards=shards,
                make_examples=functools.partial(_slow_examples),
                options={'test': 'slow_build', 'n': n},
                num_workers=num_workers,
                log=functools.partial(print, flush=True))


def _start_slow_build(data_dir, num_workers, delay):
  code = ('import sys; from tests import test_faults_data as t; '
          't.slow_build(sys.argv[1], int(sys.argv[2]))')
  env = dict(os.environ, FAULTS_SLEEP=str(delay))
  return subprocess.Popen(
      [sys.executable, '-c', code, data_dir, str(num_workers)], cwd=ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _alive(pid):
  """Running (a zombie, dead but not yet reaped, counts as ended)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def _children(pid):
  out = []
  for stat in glob.glob('/proc/[0-9]*/stat'):
    try:
      with open(stat) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid and fields[0] != 'Z':
      out.append(int(stat.split('/')[2]))
  return out


def _wait_for(predicate, timeout, what):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    time.sleep(0.1)
  raise AssertionError(f'timed out waiting for {what}')


def _kill(proc):
  if proc.poll() is None:
    proc.kill()
  proc.communicate(timeout=30)


# ---------------------------------------------------------------------------
# 3. A lock on a dataset being built.


def test_second_build_names_the_holder_and_stale_lock_recovers(tmp_path):
  if not hasattr(os, 'fork'):
    pytest.skip('POSIX only')
  data_dir = str(tmp_path / 'data')
  lock_path = os.path.join(data_dir, SLOW, '.lock')
  holder = _start_slow_build(data_dir, 1, delay=1.0)
  try:
    _wait_for(lambda: locking.read_holder(lock_path), 120, 'the lock')
    record = locking.read_holder(lock_path)
    assert record['pid'] == holder.pid
    assert record['host'] == socket.gethostname()
    result = run_cli('-m', 'data_prep.build', SLOW, f'--data_dir={data_dir}',
                     '--num_train=8', '--num_validation=4',
                     '--frames_per_video=4', '--num_workers=1')
    assert_one_line_error(
        result, f'{os.path.join(data_dir, SLOW)} is locked by pid '
        f'{holder.pid} on {socket.gethostname()} (building {SLOW}, since ')
    assert holder.poll() is None  # the first build goes on
    # kill -9: the lock file stays behind, naming a dead process.
    holder.kill()
    holder.wait(30)
    assert locking.read_holder(lock_path)['pid'] == holder.pid
    result = run_cli('-m', 'data_prep.build', SLOW, f'--data_dir={data_dir}',
                     '--num_train=8', '--num_validation=4',
                     '--frames_per_video=4', '--num_workers=1')
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'taking over the lock of pid {holder.pid}' in result.stdout
    assert len(fixtures_data.read_split(SLOW, 'train', data_dir)) == 8
    assert not os.path.exists(lock_path)
  finally:
    _kill(holder)


def test_lock_held_by_an_orphaned_child_is_recovered(tmp_path):
  """A forked child keeps its dead parent's flock; the file is replaced."""
  directory = str(tmp_path / 'workdir')
  code = ('import os, sys, time; from contextpose_jax import locking; '
          'locking.lock_dir(sys.argv[1], purpose="training")\n'
          'child = os.fork()\n'
          'if child == 0:\n'
          '  os.closerange(0, 3); time.sleep(120); os._exit(0)\n'
          'print(child, flush=True); os._exit(0)')
  result = subprocess.run([sys.executable, '-c', code, directory], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  child = int(result.stdout)
  try:
    assert _alive(child)
    lock = locking.DirLock(directory, purpose='training')
    lock.acquire()
    assert lock.recovered['purpose'] == 'training'
    with pytest.raises(locking.LockHeldError, match=(
        f'is locked by pid {os.getpid()} on {socket.gethostname()} '
        r'\(training, since')):
      locking.lock_dir(directory)
    lock.release()
    assert os.listdir(directory) == []
  finally:
    os.kill(child, signal.SIGKILL)


def test_lock_released_and_reusable_in_process(tmp_path):
  directory = str(tmp_path / 'd')
  with locking.DirLock(directory, purpose='a') as lock:
    assert lock.held and lock.recovered is None
    assert json.load(open(lock.path))['pid'] == os.getpid()
  assert not os.path.exists(os.path.join(directory, locking.LOCK_FILE))
  with locking.DirLock(directory):
    pass


# ---------------------------------------------------------------------------
# 4. Build workers end with their parent; the rerun resumes.


def test_kill_9_of_a_parallel_build_leaves_no_worker(tmp_path):
  data_dir = str(tmp_path / 'data')
  work_dir = os.path.join(data_dir, SLOW, f'.incomplete-{records.VERSION}')
  build = _start_slow_build(data_dir, 3, delay=0.25)
  workers = []
  try:
    def started():
      workers[:] = [p for p in _children(build.pid)
                    if b'spawn_main' in open(f'/proc/{p}/cmdline', 'rb').read()]
      done = glob.glob(os.path.join(work_dir, '*.array_record-*.json'))
      return len(workers) == 3 and done
    _wait_for(started, 180, 'three workers and a finished shard')
    build.kill()  # SIGKILL: no cleanup in the parent
    build.wait(30)
    deadline = time.time() + 5
    while time.time() < deadline and any(_alive(p) for p in workers):
      time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], 'workers outlived the build'
  finally:  # workers first: they hold the build's output pipes
    for pid in workers:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    _kill(build)
  assert not_registered(data_dir, SLOW)
  # The rerun resumes from the finished shards and completes; the result is
  # byte-identical to an uninterrupted build.
  rerun = _start_slow_build(data_dir, 2, delay=0)
  out, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err[-3000:]
  assert 'resuming: ' in out
  fresh = str(tmp_path / 'fresh')
  slow_build(fresh, 1)
  names = sorted(os.listdir(os.path.join(fresh, SLOW, records.VERSION)))
  assert names == sorted(os.listdir(os.path.join(data_dir, SLOW,
                                                 records.VERSION)))
  for name in names:
    if '.array_record-' in name:
      with open(os.path.join(fresh, SLOW, records.VERSION, name), 'rb') as a, \
          open(os.path.join(data_dir, SLOW, records.VERSION, name), 'rb') as b:
        assert a.read() == b.read(), name


# ---------------------------------------------------------------------------
# 5. Reader errors: one line naming the field or file.


@pytest.fixture(scope='module')
def small_synthetic(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('synthetic'))
  synthetic.build(data_dir, num_train=16, num_validation=8, frames_per_video=4,
                  examples_per_shard=6, **QUIET)
  return data_dir


def _config(name, data_dir):
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict()
  config.data = dict(name=name, data_dir=data_dir, batch_size=4,
                     backbone='hrnet_32')
  return config


def _reader_error(config, split='train'):
  with pytest.raises(pipeline.DatasetError) as e:
    list(pipeline.data_source(config, split)[i] for i in range(100))
  message = str(e.value)
  assert '\n' not in message and len(message) < 600, message
  return message


def test_unfinished_build_says_how_to_finish(small_synthetic, tmp_path):
  data_dir = str(tmp_path / 'data')
  shutil.copytree(os.path.join(small_synthetic, synthetic.NAME, '1.0.0'),
                  os.path.join(data_dir, synthetic.NAME, '.incomplete-1.0.0'))
  message = _reader_error(_config(synthetic.NAME, data_dir))
  assert message.startswith(f'data_dir={data_dir} holds only an unfinished '
                            f"build of '{synthetic.NAME}'")
  assert (f'capf-build-dataset {synthetic.NAME} --data_dir={data_dir}'
          in message) and 'again' in message


def test_wrong_dataset_name_lists_the_known_ones(small_synthetic):
  message = _reader_error(_config('human3.6m', small_synthetic))
  assert message.startswith("config.data.name='human3.6m' is not a known "
                            'dataset; known: human36m, mpi_inf_3dhp, '
                            'synthetic_human36m')
  assert f'holds: {synthetic.NAME}' in message
  message = _reader_error(_config('human36m', small_synthetic))
  assert message.startswith("dataset 'human36m' is not built under "
                            f'data_dir={small_synthetic}')


def test_wrong_split_is_one_line(small_synthetic):
  message = _reader_error(_config(synthetic.NAME, small_synthetic), 'test')
  assert "has no split 'test'" in message


@pytest.mark.parametrize('damage', ['truncate', 'corrupt'])
def test_damaged_shard_is_named(small_synthetic, tmp_path, damage):
  data_dir = str(tmp_path / 'data')
  shutil.copytree(small_synthetic, data_dir)
  shard = sorted(glob.glob(os.path.join(
      data_dir, synthetic.NAME, '1.0.0', '*-train.array_record-*')))[1]
  with open(shard, 'rb') as f:
    data = bytearray(f.read())
  if damage == 'truncate':
    data = data[:len(data) // 2]
  else:  # same size, bytes in the middle of the records changed
    data[len(data) // 3:len(data) // 3 + 64] = b'\x5a' * 64
  with open(shard, 'wb') as f:
    f.write(data)
  message = _reader_error(_config(synthetic.NAME, data_dir))
  assert message.startswith(shard + ': '), message
  assert 'corrupt' in message or 'truncated' in message or (
      'unreadable' in message)


# ---------------------------------------------------------------------------
# 6. Builder command line: expected failures are one line, exit 1.


def test_data_dir_that_is_a_file(tmp_path):
  (tmp_path / 'file').write_text('x')
  result = run_cli('-m', 'data_prep.build', SLOW,
                   f'--data_dir={tmp_path / "file"}', '--num_train=8',
                   '--num_validation=4', '--frames_per_video=4',
                   '--num_workers=1')
  assert_one_line_error(result, str(tmp_path / 'file'))


@pytest.mark.parametrize('flag,value', [('--num_workers', '0'),
                                        ('--examples_per_shard', '-1'),
                                        ('--num_train', '0'),
                                        ('--jpeg_quality', '101')])
def test_bad_option_values(tmp_path, flag, value):
  from data_prep import build  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    build.main([SLOW, f'--data_dir={tmp_path}', f'{flag}={value}'])
  assert e.value.code == 1
  assert not os.listdir(tmp_path)
