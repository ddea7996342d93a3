"""The runtime (training, evaluation, inference) needs neither torch nor
TensorFlow, and its TensorBoard events read back with TensorBoard's reader."""
import os
import subprocess
import sys
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNTIME_MODULES = (
    'contextpose_jax.api', 'contextpose_jax.train', 'contextpose_jax.evaluate',
    'contextpose_jax.predict', 'contextpose_jax.predict.pipeline', 'contextpose_jax.checkpoints', 'contextpose_jax.steps',
    'contextpose_jax.metric_writers', 'contextpose_jax.data.pipeline',
    'contextpose_jax.models.capf', 'contextpose_jax.models.hrnet', 'contextpose_jax.models.cpn',
    'contextpose_jax.models.folding', 'contextpose_jax.visualize')


def test_runtime_imports_without_torch_and_tensorflow(tmp_path):
  # `sys.modules[name] = None` is what an uninstalled package looks like to
  # `import` and to `importlib.util.find_spec` alike.
  script = textwrap.dedent(f'''
      import sys
      for name in ('torch', 'tensorflow'):
        sys.modules[name] = None
      sys.path.insert(0, {REPO!r})
      import importlib
      for name in {RUNTIME_MODULES!r}:
        importlib.import_module(name)
      from contextpose_jax import metric_writers
      w = metric_writers.create_default_writer({str(tmp_path)!r})
      w.write_scalars(1, {{'train/loss_mm': 1.5}})
      w.close()
      loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow')
                      and sys.modules[m] is not None)
      print('LOADED', loaded)
  ''')
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'LOADED []' in proc.stdout


def test_tensorboard_events_read_back(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  from contextpose_jax import metric_writers
  writer = metric_writers.create_default_writer(str(tmp_path))
  writer.write_hparams({'learning_rate': 6.4e-4, 'model.backbone': 'hrnet_32'})
  for step, loss in ((10, 3.0), (20, 2.5)):
    writer.write_scalars(step, {'train/loss_mm': loss, 'eval/mpjpe': 2 * loss})
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert set(acc.Tags()['scalars']) == {'train/loss_mm', 'eval/mpjpe'}
  events = acc.Scalars('train/loss_mm')
  assert [e.step for e in events] == [10, 20]
  np.testing.assert_allclose([e.value for e in events], [3.0, 2.5])
  np.testing.assert_allclose([e.value for e in acc.Scalars('eval/mpjpe')], [6.0, 5.0])
