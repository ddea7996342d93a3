r"""Examples/s of the training input pipeline (JPEG decode + augment + batch).

  python -m benchmarks.data_throughput [--data_dir=DIR] \
      [--name=synthetic_human36m] [--batch_size=256] [--num_batches=30] \
      [--num_workers=2] [--worker_processes=0] [--repeats=1]

or `measure(...)` from Python, which returns training examples per second.
When `name` is `synthetic_human36m` and DIR holds no build of it, the default
synthetic set (JPEG crops) is built there first (or in a temporary directory
when no DIR is given); that build is not timed.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import flags
import ml_collections
import numpy as np

from contextpose_jax import cli
from contextpose_jax import paths
from contextpose_jax.data import pipeline


def _ensure_synthetic(data_dir):
  if os.path.exists(os.path.join(data_dir, 'synthetic_human36m', '1.0.0',
                                 'dataset_info.json')):
    return
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  synthetic.build(data_dir, num_workers=os.cpu_count() or 1,
                  log=lambda *_: None)


def measure(data_dir: str | None = None, *, name: str = 'synthetic_human36m',
            batch_size: int = 256, num_batches: int = 30, warmup: int = 3,
            num_workers: int = 2, worker_processes: int = 0,
            backbone: str = 'hrnet_32', flip_per_example: bool = False,
            log=None) -> float:
  """Training examples/s over `num_batches` batches after `warmup` batches."""
  tmp = None
  if data_dir is None:
    tmp = tempfile.TemporaryDirectory(prefix='throughput_')
    data_dir = tmp.name
  try:
    if name == 'synthetic_human36m':
      _ensure_synthetic(data_dir)
    config = ml_collections.ConfigDict({
        'data': dict(name=name, data_dir=data_dir, batch_size=batch_size,
                     num_workers=num_workers, prefetch=2,
                     worker_processes=worker_processes,
                     flip_per_example=flip_per_example),
        'model': dict(backbone=backbone)})
    it = pipeline.make_train_iterator(config, seed=0)
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    cpu = time.process_time()
    for _ in range(num_batches):
      batch = next(it)
    seconds = time.perf_counter() - start
    rate = num_batches * batch['image'].shape[0] / seconds
    if log:
      log(f'{name}: {rate:.0f} train examples/s (batch {batch_size}, '
          f'{num_workers} threads, {worker_processes} processes; '
          f'{num_batches} batches in {seconds:.1f} s; process CPU, all '
          f'threads: {time.process_time() - cpu:.1f} s; {os.cpu_count()} '
          f'cores, load average {os.getloadavg()[0]:.1f})')
    return rate
  finally:
    if tmp is not None:
      tmp.cleanup()


_FLAGS = flags.FlagValues()  # this CLI's own: importable beside other CLIs
paths.define_path('data_dir', None, 'TFDS data_dir (default: a temporary '
                  'synthetic build)', flag_values=_FLAGS)
flags.DEFINE_string('name', 'synthetic_human36m', 'TFDS name', flag_values=_FLAGS)
flags.DEFINE_integer('batch_size', 256, 'examples per batch', flag_values=_FLAGS)
flags.DEFINE_integer('num_batches', 30, 'batches timed', flag_values=_FLAGS)
flags.DEFINE_integer('num_workers', 2, 'decode threads', flag_values=_FLAGS)
flags.DEFINE_integer('worker_processes', 0, 'grain worker processes',
                     flag_values=_FLAGS)
flags.DEFINE_string('backbone', 'hrnet_32', 'the backbone the batches are prepared for',
                    flag_values=_FLAGS)
flags.DEFINE_integer('repeats', 1,
                     'independent measurements (fresh iterator each); the '
                     'median is printed last: shared machines are noisy',
                     flag_values=_FLAGS)


def main(argv=None) -> int:
  """The command line (argv without the program name): 0 after the
  measurement or `--help`, 2 for a bad command line (one `error:` line)."""
  try:
    positional = cli.parse(_FLAGS, argv, __doc__)
    if positional:
      raise cli.error(f'unexpected arguments {positional}')
  except cli.Exit as e:
    return e.code
  args = cli.values(_FLAGS)
  with tempfile.TemporaryDirectory(prefix='throughput_') as tmp:
    # Without --data_dir, every repeat reads the one build made here.
    data_dir = args.data_dir or tmp
    rates = [measure(data_dir, name=args.name, batch_size=args.batch_size,
                     num_batches=args.num_batches, num_workers=args.num_workers,
                     worker_processes=args.worker_processes,
                     backbone=args.backbone, log=print)
             for _ in range(max(1, args.repeats))]
  if len(rates) > 1:
    print(f'median of {len(rates)}: {np.median(rates):.0f} train examples/s '
          f'(min {min(rates):.0f}, max {max(rates):.0f})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
