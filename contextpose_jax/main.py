r"""Trains and evaluates Context-Aware PoseFormer (CA-PF).

  python main.py --config=configs/synthetic.py --workdir=/tmp/capf_synthetic
  python main.py --config=configs/h36m_hrnet32.py --workdir=DIR \
      --config.backbone_init=weights/hrnet_w32_coco --config.data.data_dir=/data/tfds
  python main.py --config=configs/h36m_hrnet32.py --workdir=DIR \
      --config.eval_only=True --config.init_from=CONVERTED_OR_WORKDIR

A run restarted with the same --workdir resumes from its latest checkpoint.
Multi-host: pass --jax_distributed (cluster auto-detection: TPU, SLURM, ...)
or --coordinator_address/--num_processes/--process_id explicitly.
"""
import logging as logging_std
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import configs

# The configuration files shipped in the `configs` package (they import each
# other as `configs.*`, so the package must be importable: from a checkout or
# after `pip install`).
CONFIGS_DIR = os.path.dirname(os.path.abspath(configs.__file__))

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, eval.json.')
config_flags.DEFINE_config_file(
    'config', os.path.join(CONFIGS_DIR, 'synthetic.py'),
    'Training configuration file: a path, or the name of a shipped config '
    '(e.g. configs/h36m_hrnet32.py from any directory).', lock_config=True)
flags.DEFINE_bool('jax_distributed', False,
                  'Call jax.distributed.initialize() with cluster auto-detection.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process (multi-host).')
flags.mark_flags_as_required(['workdir'])


def _init_distributed():
  if FLAGS.coordinator_address or FLAGS.jax_distributed:
    # Cross-process collectives of the CPU backend need an implementation;
    # harmless on GPU/TPU. (Asking for the backend here would initialise it
    # too early.)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax / TFDS so progress and metrics stay readable."""
  NOISY = (os.sep + 'orbax' + os.sep, os.sep + 'tensorflow_datasets' + os.sep)

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or not any(
        n in record.pathname for n in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _init_distributed()
  # Imported after the distributed init (it must precede any JAX computation).
  from contextpose_jax import train  # pylint: disable=g-import-not-at-top
  from contextpose_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from data_prep import build  # pylint: disable=g-import-not-at-top
  logging.info('JAX process %d/%d, local devices %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  pipeline.resolve_data_dir(FLAGS.config)
  build.build_if_missing(FLAGS.config, log=logging.info)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def resolve_config_arg(argv):
  """`--config=configs/NAME.py` names the shipped config when no such file
  exists relative to the working directory (e.g. after `pip install`)."""
  out = []
  for arg in argv:
    if arg.startswith('--config='):
      path, sep, overrides = arg[len('--config='):].partition(':')
      shipped = os.path.join(CONFIGS_DIR, os.path.basename(path))
      if not os.path.exists(path) and os.path.isfile(shipped):
        arg = f'--config={shipped}{sep}{overrides}'
    out.append(arg)
  return out


def run():
  """Console-script entry point (`capf-train`) and `python main.py`."""
  sys.modules['__main__'].__doc__ = __doc__  # what absl prints for --help
  app.run(main, argv=resolve_config_arg(sys.argv))


if __name__ == '__main__':
  run()
