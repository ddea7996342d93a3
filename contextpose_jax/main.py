r"""Trains and evaluates Context-Aware PoseFormer (CA-PF).

  capf-train --config=configs/synthetic.py --workdir=/tmp/capf_synthetic
  capf-train --config=configs/h36m_hrnet32.py --workdir=DIR \
      --config.backbone_init=ckpt/hrnet_w32_coco --config.data.data_dir=/data/tfds
  capf-train --config=configs/h36m_hrnet32.py --workdir=DIR \
      --config.eval_only=True --config.init_from=CONVERTED_OR_WORKDIR

(`python main.py ...` from a checkout.) Path flags and config paths expand `~`
and `$VARS`. The console shows plain log lines, a line before each
compilation and, on a terminal, progress bars; WORKDIR/train.log keeps the
full log.

A run restarted with the same --workdir resumes from its latest checkpoint.
SIGTERM / SIGINT (a preemptible VM, a scheduler, Ctrl-C) stop it after the
current step with a saved checkpoint (exit status 128 + signal number).
Mistakes in the flags or the config, a missing dataset, a workdir in use
by another run or trained with another model, and a run that diverged are
one line `error: ...` on stderr and exit status 1.
Multi-host: pass --jax_distributed (cluster auto-detection: TPU, SLURM, ...)
or --coordinator_address/--num_processes/--process_id explicitly.
"""
import logging as logging_std
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from contextpose_jax import cli
from contextpose_jax import compile_cache
from contextpose_jax import host_devices
from contextpose_jax import host_memory
from contextpose_jax import paths

FLAGS = flags.FLAGS
paths.define_path('workdir', None, 'Directory for checkpoints, logs, eval.json.')
# No default here: absl would load it (and apply the overrides) as this module
# is imported; `run` adds DEFAULT_CONFIG when --config is left out.
DEFAULT_CONFIG = os.path.join(cli.CONFIGS_DIR, 'synthetic.py')
config_flags.DEFINE_config_file(
    'config', None,
    'Training configuration file: a path, or the name of a shipped config '
    '(e.g. configs/h36m_hrnet32.py from any directory); default: '
    'configs/synthetic.py.', lock_config=True)
flags.DEFINE_bool('jax_distributed', False,
                  'Call jax.distributed.initialize() with cluster auto-detection.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process (multi-host).')
paths.define_path('compilation_cache', 'default',
                  "JAX's persistent compilation cache directory; 'default': "
                  '$CONTEXTPOSE_JAX_CACHE or ~/.cache/contextpose_jax/xla; off: off',
                  keep=('default', *compile_cache.OFF))
flags.DEFINE_enum('host_malloc', None, host_memory.SETTINGS,
                  'glibc malloc settings that spare XLA:CPU a page fault per touched '
                  'page of its temporaries every step (contextpose_jax/host_memory.py); '
                  'default: $CONTEXTPOSE_JAX_HOST_MALLOC, else auto (on for CPU-only JAX)')
flags.mark_flags_as_required(['workdir'])


def _init_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator_address or FLAGS.jax_distributed:
    # Cross-process collectives of the CPU backend need an implementation;
    # harmless on GPU/TPU. (Asking for the backend here would initialise it
    # too early.)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax / TFDS so progress and metrics stay readable,
  JAX's INFO line about the TPU backend it probes and does not find, and the
  warnings orbax prints whenever a checkpoint is opened read-only (as every
  evaluation of a saved model does): none of them says anything is wrong.
  Orbax's error records keep their message but not their traceback: the
  run's own one-line error says what failed."""
  NOISY = (os.sep + 'orbax' + os.sep, os.sep + 'tensorflow_datasets' + os.sep)
  ORBAX_READ_ONLY = ('CheckpointManagerOptions.read_only=True',
                     'Given directory is read only')

  def filter(self, record):
    msg = str(record.msg)
    orbax = os.sep + 'orbax' + os.sep in record.pathname
    if orbax and msg.startswith(self.ORBAX_READ_ONLY):
      return False
    if orbax and record.exc_info and not logging.level_debug():
      # A failed save: the run reports it in one line (checkpoints.py); the
      # traceback (hundreds of lines) stays available with --verbosity=1.
      record.exc_info, record.exc_text = None, None
    if record.levelno >= logging_std.WARNING:
      return True
    if record.name.startswith('jax') and msg.startswith('Unable to initialize backend'):
      return False
    return not any(n in record.pathname for n in self.NOISY)


def _fail(message: str, status: int = 1):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def _first_line(text: str) -> str:
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  return lines[0] if lines else ''


def _override_error(argv, error: Exception) -> str:
  """The `--config.PATH` override that names a field the config lacks."""
  # ml_collections wraps KeyError("'name'\nDid you mean ...") in AttributeError.
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  lines = [l.strip() for l in str(error.args[0] if error.args else error).splitlines()]
  missing = lines[0].strip('"\'') if lines else '?'
  hint = f' ({lines[1]})' if len(lines) > 1 and lines[1] else ''
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      fields = arg[len('--config.'):].split('=', 1)[0].split('.')
      if missing in fields:
        parent = '.'.join(['config'] + fields[:fields.index(missing)])
        return f'{arg}: {parent} has no field {missing!r}{hint}'
  return f'the config has no field {missing!r}{hint}'


def parse_flags(argv):
  """absl's flag parsing, with each mistake as one line (`error: ...`)."""
  if any(a in cli.HELP for a in argv[1:]):
    # absl lists the flags of the `__main__` module, which a console script
    # is not: show this module's (and exit 0).
    print(f'{__doc__.strip()}\n\nflags:\n'
          + FLAGS.module_help(__name__).strip().split('\n', 1)[1])
    sys.exit(0)
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys  # pylint: disable=pointless-statement  # raises if it failed to load
    paths.expand_config(FLAGS.config)
  except flags.Error as e:
    text = str(e)
    # A config file that raised: its traceback is the useful part.
    _fail(text if 'Error whilst parsing config file' in text
          else cli.one_line(_first_line(text)))
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for `--config.typo=...` (a field the
    # config does not have).
    _fail(_override_error(argv, e))
  except OSError as e:  # the config file itself (missing, unreadable)
    _fail(cli.config_file_error(argv[1:], e))
  if not FLAGS.workdir:  # `--workdir=` (absl only refuses a missing one)
    _fail('--workdir is required')
  return rest


def with_default_config(argv):
  """`argv` with `--config=DEFAULT_CONFIG` when it names no config."""
  if any(a == '--config' or a.startswith('--config=') for a in argv[1:]):
    return list(argv)
  return [*argv, f'--config={DEFAULT_CONFIG}']


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])} (flags are --name=value)')
  from contextpose_jax import progress  # pylint: disable=g-import-not-at-top
  # The console: plain lines (no absl prefix, no thread ids), the noise of
  # the libraries left out, written through tqdm (bars stay intact).
  root = logging_std.getLogger()
  root.removeHandler(logging.get_absl_handler())
  console = progress.ConsoleHandler()
  console.addFilter(_QuietLibraries())
  root.addHandler(console)
  host_devices.skip_absent_backends()
  try:  # first: it must precede the JAX backend's start
    host_memory.configure(FLAGS.host_malloc)
  except ValueError as e:  # a bad $CONTEXTPOSE_JAX_HOST_MALLOC
    _fail(str(e))
  _init_distributed()
  compile_cache.enable(FLAGS.compilation_cache)
  import jax  # pylint: disable=g-import-not-at-top  # once the flags are valid
  # WORKDIR/train.log: every record, absl's full format (before the console
  # handler: its filter trims orbax's tracebacks).
  index = jax.process_index()
  root.handlers.insert(0, progress.WorkdirLog(
      FLAGS.workdir, 'train.log' if index == 0 else f'train.{index}.log'))
  # Imported after the distributed init (it must precede any JAX computation).
  from contextpose_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from contextpose_jax import config_validation  # pylint: disable=g-import-not-at-top
  from contextpose_jax import divergence  # pylint: disable=g-import-not-at-top
  from contextpose_jax import locking  # pylint: disable=g-import-not-at-top
  from contextpose_jax import train  # pylint: disable=g-import-not-at-top
  from contextpose_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from data_prep import build  # pylint: disable=g-import-not-at-top
  # Mistakes and conditions of the input (each one line); any other
  # exception is a bug and keeps its traceback.
  expected = (config_validation.ConfigError, pipeline.DatasetError,
              locking.LockHeldError, FileNotFoundError, PermissionError, ValueError,
              divergence.Diverged, checkpoints.CheckpointError)
  try:
    logging.info('JAX process %d/%d, local devices %s', jax.process_index(),
                 jax.process_count(), jax.local_devices())
    pipeline.resolve_data_dir(FLAGS.config)
    # The config alone, before the synthetic set is built; train_and_evaluate
    # then checks the data, before it compiles anything.
    config_validation.check_fields(FLAGS.config, jax.device_count(), FLAGS.workdir)
    build.build_if_missing(FLAGS.config, log=logging.info)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except expected as e:
    # The traceback stays available with --verbosity=1.
    logging.debug('traceback of the error below', exc_info=True)
    _fail(f'{e.filename}: {e.strerror}' if isinstance(e, OSError) and e.filename
          else _first_line(str(e)))
  except KeyboardInterrupt:  # outside the training loop: nothing unsaved
    _fail('interrupted; the checkpoints in --workdir are kept: rerun the same '
          'command to resume', status=130)


def run():
  """Console-script entry point (`capf-train`) and `python main.py`."""
  sys.modules['__main__'].__doc__ = __doc__  # what absl prints for --help
  argv = with_default_config(cli.resolve_config_arg(sys.argv))
  app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
