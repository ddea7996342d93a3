"""Builds a TFDS dataset of this project (replaces `tfds build`, no beam).

  python -m data_prep.build NAME --manual_dir=DIR --data_dir=DIR \
      [--image_format=jpeg|png]

NAME is one of `human36m`, `mpi_inf_3dhp`, `synthetic_human36m` (the TFDS
name; read the result with `tfds.data_source(NAME, split=..., data_dir=DIR)`).
`synthetic_human36m` needs no --manual_dir. Builds run in parallel
(`--num_workers`), print progress, resume an interrupted run, and register the
dataset only once every shard is written.
"""
from __future__ import annotations

import argparse
import os
import sys

from contextpose_jax import image_io
from contextpose_jax import locking
from data_prep import records

NAMES = ('human36m', 'mpi_inf_3dhp', 'synthetic_human36m')


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog='python -m data_prep.build', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('name', choices=NAMES)
  p.add_argument('--manual_dir', help='the downloaded / prepared files')
  p.add_argument('--data_dir', required=True, help='TFDS data_dir to write')
  p.add_argument('--image_format', default='jpeg', choices=('jpeg', 'png'),
                 help='crops as JPEG (default) or lossless PNG')
  p.add_argument('--jpeg_quality', type=int, default=95)
  p.add_argument('--num_workers', type=int, default=os.cpu_count() or 1,
                 help='processes writing shards in parallel')
  p.add_argument('--examples_per_shard', type=int, default=None)
  p.add_argument('--overwrite', action='store_true',
                 help='replace an existing finished build')
  g = p.add_argument_group('human36m')
  g.add_argument('--frame_source', default='auto',
                 choices=('auto', 'jpeg', 'video'),
                 help='frames from the images/ JPEG tree or the original '
                 'extracted/S*/Videos/*.mp4 (auto: whichever exists)')
  g.add_argument('--labels', default='auto', choices=('auto', 'pickle', 'raw'),
                 help='H36M-Toolbox pickles, or generate them from the raw '
                 'CDF poses (auto: pickles when present)')
  g = p.add_argument_group('synthetic_human36m')
  g.add_argument('--num_train', type=int, default=4096)
  g.add_argument('--num_validation', type=int, default=1024)
  g.add_argument('--frames_per_video', type=int, default=64)
  g.add_argument('--seed', type=int, default=0)
  return p.parse_args(argv)


def check_args(args) -> None:
  """Option values, before any work (one line naming the option)."""
  positive = {'--num_workers': args.num_workers,
              '--examples_per_shard': args.examples_per_shard}
  if args.name == 'synthetic_human36m':
    positive.update({'--num_train': args.num_train,
                     '--num_validation': args.num_validation,
                     '--frames_per_video': args.frames_per_video})
  for flag, value in positive.items():
    if value is not None and value < 1:
      raise records.DataError(f'{flag} must be at least 1, got {value}')
  if not 0 <= args.jpeg_quality <= 100:
    raise records.DataError(f'--jpeg_quality must be in 0..100, got '
                            f'{args.jpeg_quality}')


def run(args) -> str:
  check_args(args)
  common = dict(data_dir=args.data_dir, image_format=args.image_format,
                jpeg_quality=args.jpeg_quality, num_workers=args.num_workers,
                overwrite=args.overwrite)
  if args.examples_per_shard is not None:
    common['examples_per_shard'] = args.examples_per_shard
  if args.name == 'synthetic_human36m':
    from data_prep import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.build(
        num_train=args.num_train, num_validation=args.num_validation,
        frames_per_video=args.frames_per_video, seed=args.seed, **common)
  if not args.manual_dir:
    raise records.DataError(f'{args.name} needs --manual_dir')
  if not os.path.isdir(args.manual_dir):
    raise records.DataError(f'--manual_dir={args.manual_dir} is not a '
                            'directory')
  if args.name == 'human36m':
    from data_prep import human36m  # pylint: disable=g-import-not-at-top
    return human36m.build(args.manual_dir, frame_source=args.frame_source,
                          labels=args.labels, **common)
  from data_prep import mpi_inf_3dhp  # pylint: disable=g-import-not-at-top
  return mpi_inf_3dhp.build(args.manual_dir, **common)


def build_if_missing(config, log=print) -> None:
  """Builds the download-free synthetic set on first use (`main.py`).

  Only `synthetic_human36m` with `config.data.build_if_missing` is built; an
  existing build in `config.data.data_dir` is used as it is. With several
  processes, process 0 builds and the others wait for it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from data_prep import synthetic  # pylint: disable=g-import-not-at-top
  if not (config.data.get('build_if_missing', False) and config.data.name == synthetic.NAME):
    return
  final_dir = os.path.join(config.data.data_dir, synthetic.NAME, records.VERSION)
  if jax.process_index() == 0 and not os.path.isdir(final_dir):
    options = config.data.get('synthetic', None) or {}
    options = dict(options.to_dict() if hasattr(options, 'to_dict') else options)
    log(f'Building {synthetic.NAME} into {config.data.data_dir} (first use): {options}')
    synthetic.build(config.data.data_dir, log=log, **options)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('dataset_built')


def main(argv=None):
  """The command line: expected failures are one line `error: ...` on
  stderr and exit status 1 (no traceback)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    run(args)
  except (records.DataError, locking.LockHeldError,
          image_io.ImageError) as e:
    records.fail(str(e))
  except OSError as e:  # unreadable input, unwritable --data_dir, disk full
    where = f'{e.filename}: ' if e.filename else ''
    records.fail(f'{where}{e.strerror or e}')
  except KeyboardInterrupt:
    records.fail('interrupted; run the same command again to resume the '
                 'build', status=130)


if __name__ == '__main__':
  main()
