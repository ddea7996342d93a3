"""Two JAX processes on localhost (jax.distributed + gloo CPU collectives),
each reading only its rows of every global batch through the input pipeline,
take the same train steps and produce the same evaluation as one process fed
the same global batches. The second step is an epoch's partial last batch
(64 examples in batches of 48: 16 real rows, all on host 0; host 1 holds
only padding)."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 2

_WORKER = textwrap.dedent('''
    import json, sys
    import jax
    num_processes, process_id, port, data_dir, out = (
        int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    if num_processes > 1:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(coordinator_address=f'127.0.0.1:{{port}}',
                                 num_processes=num_processes, process_id=process_id)
    import numpy as np
    sys.path.insert(0, {repo!r})
    from configs import tiny_test
    from contextpose_jax import evaluate, parallel, steps
    from contextpose_jax.data import pipeline
    from contextpose_jax.models import capf

    config = tiny_test.get_config()
    config.data.data_dir = data_dir
    # Frozen backbone (tiny_test): the cross-process gradient all-reduce is the
    # lifter's; test_train.py covers BatchNorm statistics over a sharded batch.
    config.learning_rate = 1e-3
    config.data.flip_per_example = True  # flips differ across the hosts' rows
    config.eps = 1e-3  # Adam would blow float noise of near-0 gradients up to +-lr
    config.data.batch_size = 48
    mesh = parallel.make_mesh()
    model = capf.build_model(config.model)
    tx = steps.make_optimizer(config)
    variables = steps.he_init_backbone(steps.init_variables(model, config.seed), 0)
    state = jax.device_put(steps.create_train_state(config, model, variables, tx),
                           parallel.replicated(mesh))
    step = steps.make_train_step(model, tx, steps.learning_rate_fn(config, 16), mesh, False)

    if num_processes > 1:
      it = pipeline.make_train_iterator(config, seed=config.seed, start_step=0)
      batches = [next(it) for _ in range({steps})]
      assert jax.process_count() == 2 and jax.device_count() == 2
      assert len(batches[0]['image']) == config.data.batch_size // 2  # local rows only
      want = [24, 16] if jax.process_index() == 0 else [24, 0]
      assert [int(b['mask'].sum()) for b in batches] == want, [b['mask'] for b in batches]
    else:
      # One process, the same global batches: the hosts' shards concatenated
      # in process order (as make_array_from_process_local_data lays them out).
      parts = []
      for host in range(2):
        pipeline._process_info = lambda host=host: (host, 2)
        it = pipeline.make_train_iterator(config, seed=config.seed, start_step=0)
        parts.append([next(it) for _ in range({steps})])
      pipeline._process_info = lambda: (0, 1)
      batches = [{{k: np.concatenate([a[k], b[k]]) for k in a}} for a, b in zip(*parts)]
    losses = []
    examples = []
    for b in batches:
      state, m = step(state, parallel.global_batch(b, mesh))
      losses.append(float(m['loss']))
      examples.append(int(m['examples']))
    predict_fn = steps.make_predict_step(model, mesh, config.model.dataset, config.flip_test)
    preds = evaluate.predict_split(config, state.variables(), predict_fn, mesh)
    result = evaluate.compute_metrics(config, preds)
    if jax.process_index() == 0:
      params = jax.device_get(state.variables())
      leaves = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(params)]
      with open(out, 'w') as f:
        json.dump(dict(losses=losses, examples=examples, params=leaves, mpjpe=result['mpjpe'],
                       p_mpjpe=result['p_mpjpe'], n=int(len(preds['pred'])),
                       frames=preds['frame'].tolist(), video=preds['video_id'].tolist()), f)
''')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  sys.path.insert(0, REPO)
  from configs import tiny_test
  from data_prep import synthetic
  data_dir = tmp_path / 'data'
  options = dict(tiny_test.get_config().data.synthetic.to_dict(), num_train=64)
  synthetic.build(str(data_dir), log=lambda *a: None, **options)
  script = tmp_path / 'worker.py'
  script.write_text(_WORKER.format(repo=REPO, steps=NUM_STEPS))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  port = str(_free_port())
  outs = [tmp_path / 'host.json', tmp_path / 'host1.json', tmp_path / 'single.json']
  procs = [subprocess.Popen([sys.executable, str(script), '2', str(i), port, str(data_dir),
                             str(outs[i])], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  procs.append(subprocess.Popen([sys.executable, str(script), '1', '0', '0', str(data_dir),
                                 str(outs[2])], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=900)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  multi = json.loads(outs[0].read_text())
  single = json.loads(outs[2].read_text())
  np.testing.assert_allclose(multi['losses'], single['losses'], rtol=1e-5)
  assert multi['examples'] == single['examples'] == [48, 16]
  assert len(multi['params']) == len(single['params'])
  for a, b in zip(multi['params'], single['params']):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Evaluation gathers every host's predictions: each example once, in order.
  assert multi['n'] == single['n'] == 64
  assert multi['frames'] == single['frames'] and multi['video'] == single['video']
  np.testing.assert_allclose(multi['mpjpe'], single['mpjpe'], rtol=1e-4)
  np.testing.assert_allclose(multi['p_mpjpe'], single['p_mpjpe'], rtol=1e-4)
