r"""Builds a TFDS dataset of this project (replaces `tfds build`, no beam).

  capf-build-dataset NAME --manual_dir=DIR --data_dir=DIR \
      [--image_format=jpeg|png]         (or --name=NAME)
  python -m data_prep.build NAME ...   (the same, from a checkout)

NAME is one of `human36m`, `mpi_inf_3dhp`, `synthetic_human36m` (the TFDS
name; read the result with `tfds.data_source(NAME, split=..., data_dir=DIR)`).
`synthetic_human36m` needs no --manual_dir; its default size is the quick
start's (configs/synthetic.py). Paths may use `~` and `$VARS`. Builds run in parallel
(`--num_workers`), print progress, resume an interrupted run, and register the
dataset only once every shard is written.
"""
from __future__ import annotations

import os
import sys

from absl import flags

from configs import synthetic as synthetic_config
from contextpose_jax import cli
from contextpose_jax import host_devices
from contextpose_jax import locking
from contextpose_jax import paths

# jax, TFDS, OpenCV and the builders are imported once the command line is
# valid (`_builders()`): `--help` and a bad flag answer at once.

NAMES = ('human36m', 'mpi_inf_3dhp', 'synthetic_human36m')
SYNTHETIC = synthetic_config.SYNTHETIC_OPTIONS


_FLAGS = flags.FlagValues()  # this CLI's own: importable beside other CLIs
flags.DEFINE_enum('name', None, NAMES,
                  'the dataset (or give it as the first argument)',
                  flag_values=_FLAGS)
paths.define_path('manual_dir', None, 'the downloaded / prepared files',
                  flag_values=_FLAGS)
paths.define_path('data_dir', None, 'TFDS data_dir to write (required)',
                  flag_values=_FLAGS)
flags.DEFINE_enum('image_format', 'jpeg', ('jpeg', 'png'),
                  'crops as JPEG (default) or lossless PNG', flag_values=_FLAGS)
flags.DEFINE_integer('jpeg_quality', 95, 'JPEG quality, 0..100',
                     flag_values=_FLAGS)
flags.DEFINE_integer('num_workers', os.cpu_count() or 1,
                     'processes writing shards in parallel', flag_values=_FLAGS)
flags.DEFINE_integer('examples_per_shard', None,
                     'examples per shard (default: the builder\'s)',
                     flag_values=_FLAGS)
flags.DEFINE_bool('overwrite', False, 'replace an existing finished build',
                  flag_values=_FLAGS)
# human36m
flags.DEFINE_enum('frame_source', 'auto', ('auto', 'jpeg', 'video'),
                  'human36m: frames from the images/ JPEG tree or the original '
                  'extracted/S*/Videos/*.mp4 (auto: whichever exists)',
                  flag_values=_FLAGS)
flags.DEFINE_enum('labels', 'auto', ('auto', 'pickle', 'raw'),
                  'human36m: H36M-Toolbox pickles, or generate them from the '
                  'raw CDF poses (auto: pickles when present)',
                  flag_values=_FLAGS)
# synthetic_human36m
# synthetic_human36m: the defaults are the quick start's set (configs/synthetic.py).
flags.DEFINE_integer('num_train', SYNTHETIC['num_train'],
                     'synthetic_human36m: train examples', flag_values=_FLAGS)
flags.DEFINE_integer('num_validation', SYNTHETIC['num_validation'],
                     'synthetic_human36m: validation examples',
                     flag_values=_FLAGS)
flags.DEFINE_integer('frames_per_video', SYNTHETIC['frames_per_video'],
                     'synthetic_human36m', flag_values=_FLAGS)
flags.DEFINE_integer('seed', SYNTHETIC['seed'], 'synthetic_human36m',
                     flag_values=_FLAGS)


def parse_args(argv):
  """The command line (no program name) as attributes; `cli.Exit` after
  `--help` or on a bad command line (one `error:` line)."""
  positional = cli.parse(_FLAGS, argv, __doc__)
  args = cli.values(_FLAGS)
  # absl has no positional arguments: NAME is the one non-flag argument.
  if len(positional) > 1:
    raise cli.error(f'one dataset name expected, got {positional}')
  if positional:
    if positional[0] not in NAMES:
      raise cli.error(f'unknown dataset {positional[0]!r}; choose from '
                      f'{", ".join(NAMES)}')
    if args.name not in (None, positional[0]):
      raise cli.error(f'two dataset names: {positional[0]} and '
                      f'--name={args.name}')
    args.name = positional[0]
  if args.name is None:
    raise cli.error(f'the dataset name is required: one of {", ".join(NAMES)}')
  if not args.data_dir:
    raise cli.error('--data_dir is required')
  return args


def _builders():
  """The heavy modules: (records, synthetic, human36m, mpi_inf_3dhp)."""
  # pylint: disable=g-import-not-at-top
  from data_prep import human36m
  from data_prep import mpi_inf_3dhp
  from data_prep import records
  from data_prep import synthetic
  return records, synthetic, human36m, mpi_inf_3dhp


def check_args(args) -> None:
  """Option values, before any work (one line naming the option)."""
  records = _builders()[0]
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
  records, synthetic, human36m, mpi_inf_3dhp = _builders()
  check_args(args)
  common = dict(data_dir=args.data_dir, image_format=args.image_format,
                jpeg_quality=args.jpeg_quality, num_workers=args.num_workers,
                overwrite=args.overwrite)
  if args.examples_per_shard is not None:
    common['examples_per_shard'] = args.examples_per_shard
  if args.name == 'synthetic_human36m':
    return synthetic.build(
        num_train=args.num_train, num_validation=args.num_validation,
        frames_per_video=args.frames_per_video, seed=args.seed, **common)
  if not args.manual_dir:
    raise records.DataError(f'{args.name} needs --manual_dir')
  if not os.path.isdir(args.manual_dir):
    raise records.DataError(f'--manual_dir={args.manual_dir} is not a '
                            'directory')
  if args.name == 'human36m':
    return human36m.build(args.manual_dir, frame_source=args.frame_source,
                          labels=args.labels, **common)
  return mpi_inf_3dhp.build(args.manual_dir, **common)


def build_if_missing(config, log=print) -> None:
  """Builds the download-free synthetic set on first use (`capf-train`).

  Only `synthetic_human36m` with `config.data.build_if_missing` is built. An
  existing build in `config.data.data_dir` is used only when it is the set
  the config asks for (`check_synthetic_build`). With several processes,
  process 0 builds and the others wait for it.
  """
  if not (config.data.get('build_if_missing', False)
          and config.data.name == synthetic_config.SYNTHETIC_NAME):
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  records, synthetic, _, _ = _builders()
  data_dir = config.data.data_dir
  final_dir = os.path.join(data_dir, synthetic.NAME, records.VERSION)
  options = config.data.get('synthetic', None) or {}
  options = dict(options.to_dict() if hasattr(options, 'to_dict') else options)
  if os.path.isdir(final_dir):
    check_synthetic_build(final_dir, data_dir, dict(synthetic.OPTIONS, **options))
  elif jax.process_index() == 0:
    log(f'Building {synthetic.NAME} into {data_dir} (first use): {options}')
    synthetic.build(data_dir, log=log, **options)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('dataset_built')


def check_synthetic_build(final_dir: str, data_dir: str, asked: dict) -> None:
  """Raises `records.DataError` (one line: found, asked, how to rebuild)
  when the finished build in `final_dir` is not the set `asked` describes."""
  records, synthetic, _, _ = _builders()
  found = records.built_options(final_dir)
  if found is None:  # built before the options were kept: the split sizes
    sizes = records.split_sizes(final_dir)
    found = {'num_train': sizes.get('train'), 'num_validation': sizes.get('validation')}
  differ = [k for k in asked if k in found and found[k] != asked[k]]
  if not differ:
    return
  flags_ = ' '.join(f'--{k}={asked[k]}' for k in asked)
  raise records.DataError(
      f'{final_dir} holds another synthetic set: '
      f'{", ".join(f"{k}={found[k]}" for k in differ)}; the config asks for '
      f'{", ".join(f"{k}={asked[k]}" for k in differ)}. Rebuild it with '
      f'`capf-build-dataset {synthetic.NAME} --data_dir={data_dir} {flags_} '
      '--overwrite`, or choose another --config.data.data_dir')


def main(argv=None) -> int:
  """The command line (`capf-build-dataset`; argv without the program name).

  Returns 0 after a build or `--help`, 2 for a bad command line; failures of
  the build are one line `error: ...` on stderr and SystemExit(1) (no
  traceback).
  """
  try:
    args = parse_args(argv)
  except cli.Exit as e:
    return e.code
  host_devices.skip_absent_backends()
  from contextpose_jax import image_io  # pylint: disable=g-import-not-at-top
  records = _builders()[0]
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
  return 0


if __name__ == '__main__':
  sys.exit(main())
