"""Train-step machinery: AdamW + schedule vs torch, frozen backbone, NaN guard,
and the 4-device step against the 1-device step (subprocess)."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from contextpose_jax import compiler_options
from contextpose_jax import parallel
from contextpose_jax import steps
from contextpose_jax.models import capf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny real CA-PF: HRNet of width 4 on 64x64 images (the backbone needs sizes
# divisible by 32); the model itself is the one main.py trains.
TINY_BACKBONE = dict(width=4, stage_modules=(1, 1, 1), num_blocks=1, stem_channels=8,
                     layer1_blocks=1)


def _config(train_backbone=False, **over):
  from configs import default
  config = default.get_config()
  config.model.backbone_kwargs = ml_collections.ConfigDict(TINY_BACKBONE)
  config.model.embed_dim = 16
  config.model.depth = 1
  config.model.train_backbone = train_backbone
  config.learning_rate = 1e-3
  for k, v in over.items():
    config[k] = v
  return config


def _batch(n, seed=0, size=64):
  rng = np.random.default_rng(seed)
  kp = rng.uniform(0.2 * size, 0.8 * size, size=(n, 17, 2)).astype(np.float32)
  return {
      'image': rng.normal(size=(n, size, size, 3)).astype(np.float32),
      'keypoints_2d': (kp / size * 2 - 1).astype(np.float32),
      # crop pixels of the official 192x256 crop frame
      'keypoints_2d_crop': (kp * np.array([192, 256]) / size).astype(np.float32),
      'keypoints_3d': rng.normal(scale=0.3, size=(n, 17, 3)).astype(np.float32),
  }


def _init_variables(config):
  model = capf.build_model(config.model)
  images = jnp.zeros((1, 64, 64, 3))
  kp = jnp.zeros((1, 17, 2))
  variables = compiler_options.jit(model.init, run_once=True)(
      jax.random.PRNGKey(0), images, kp, kp)
  if config.model.train_backbone:  # from scratch, as train_and_evaluate does
    variables = steps.he_init_backbone(variables, 0)
  return variables


def _setup(config, mesh, variables=None):
  """The model, optimizer, replicated train state and train step on `mesh`
  (`variables`: initialized here when not given)."""
  model = capf.build_model(config.model)
  tx = steps.make_optimizer(config)
  if variables is None:
    variables = _init_variables(config)
  state = steps.create_train_state(config, model, variables, tx)
  state = jax.device_put(state, parallel.replicated(mesh))
  step = steps.make_train_step(model, tx, steps.learning_rate_fn(config, 2), mesh,
                               config.model.train_backbone)
  return model, tx, state, step


def test_adamw_and_epoch_schedule_match_torch():
  import torch  # here: the multi-device subprocess imports this module
  config = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, lr_decay=0.5, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8,
      grad_clip_norm=0.5))
  rng = np.random.default_rng(0)
  p0 = {'a': rng.normal(size=(3, 4)).astype(np.float32), 'b': rng.normal(size=(5,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in p0.items()}
           for _ in range(7)]
  steps_per_epoch = 2

  tx = steps.make_optimizer(config)
  lr_fn = steps.learning_rate_fn(config, steps_per_epoch)
  params = jax.tree.map(jnp.asarray, p0)
  opt_state = tx.init(params)
  for step, g in enumerate(grads):
    updates, opt_state = tx.update(g, opt_state, params)
    params = jax.tree.map(lambda p, u: p - lr_fn(step) * u, params, updates)

  tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
  opt = torch.optim.AdamW(list(tp.values()), lr=config.learning_rate, weight_decay=0.1)
  for step, g in enumerate(grads):
    for k in tp:
      tp[k].grad = torch.tensor(g[k])
    torch.nn.utils.clip_grad_norm_(list(tp.values()), config.grad_clip_norm)
    opt.step()
    if (step + 1) % steps_per_epoch == 0:  # official: lr *= decay after each epoch
      for group in opt.param_groups:
        group['lr'] *= config.lr_decay
  for k in p0:
    np.testing.assert_allclose(np.asarray(params[k]), tp[k].detach().numpy(),
                               rtol=1e-5, atol=1e-6)


def test_frozen_backbone_step_and_nan_guard():
  config = _config(train_backbone=False)
  mesh = parallel.make_mesh()
  model, tx, state, step = _setup(config, mesh)
  # The frozen backbone is not trained: no parameters, no Adam moments.
  assert 'backbone' not in state.params and 'backbone' in state.frozen_params
  n_trained = sum(x.size for x in jax.tree.leaves(state.params))
  n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert n_moments == 2 * n_trained
  before = jax.device_get(state)

  batch = _batch(4)
  # Independent reference of the first step: MPJPE loss, grads w.r.t. the
  # lifter only; Adam's first update is g / (|g| + eps), plus decoupled decay.
  def loss(lifter):
    variables = {'params': {**before.frozen_params, **lifter},
                 'batch_stats': before.batch_stats}
    pred = model.apply(variables, batch['image'], batch['keypoints_2d'],
                       batch['keypoints_2d_crop'], train=True,
                       rngs={'dropout': jax.random.fold_in(before.rng, 0)})
    return jnp.mean(jnp.sqrt(jnp.sum((pred[:, 0] - batch['keypoints_3d'])**2, -1)))
  ref_loss, g = jax.jit(jax.value_and_grad(loss))(before.params)
  lr = config.learning_rate
  expected = jax.tree.map(lambda p, g: p - lr * (g / (jnp.abs(g) + 1e-8) + 0.1 * p),
                          before.params, g)

  state, metrics = step(state, parallel.global_batch(batch, mesh))
  after = jax.device_get(state)
  np.testing.assert_allclose(metrics['loss'], ref_loss, rtol=1e-6)
  for a, b, gg in zip(jax.tree.leaves(after.params), jax.tree.leaves(expected),
                      jax.tree.leaves(g)):
    # g / (|g| + eps) is a sign except for |g| near eps, where float noise of
    # two gradient computations matters: tight where |g| is clear of it.
    clear = np.abs(np.asarray(gg)) > 1e-5
    np.testing.assert_allclose(np.asarray(a)[clear], np.asarray(b)[clear], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, b, atol=2 * lr)
  jax.tree.map(np.testing.assert_array_equal, after.frozen_params, before.frozen_params)
  jax.tree.map(np.testing.assert_array_equal, after.batch_stats, before.batch_stats)
  assert int(after.step) == 1 and int(after.nan_count) == 0

  # A NaN loss skips the update (params, moments, Adam count) but is counted.
  bad = dict(batch, keypoints_3d=np.full_like(batch['keypoints_3d'], np.nan))
  state, metrics = step(state, parallel.global_batch(bad, mesh))
  skipped = jax.device_get(state)
  assert np.isnan(metrics['loss']) and int(metrics['skipped']) == 1
  assert int(skipped.step) == 2 and int(skipped.nan_count) == 1
  jax.tree.map(np.testing.assert_array_equal, skipped.params, after.params)
  jax.tree.map(np.testing.assert_array_equal, skipped.opt_state, after.opt_state)


def test_learning_rate_decays_per_epoch():
  config = ml_collections.ConfigDict(dict(learning_rate=6.4e-4, lr_decay=0.99))
  lr = steps.learning_rate_fn(config, steps_per_epoch=10)
  np.testing.assert_allclose([lr(0), lr(9), lr(10), lr(25)],
                             [6.4e-4, 6.4e-4, 6.4e-4 * 0.99, 6.4e-4 * 0.99**2], rtol=1e-6)


_MULTI_DEVICE_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    import test_train as t
    from contextpose_jax import parallel
    assert jax.device_count() == 4, jax.devices()
    # Fine-tuned backbone (BatchNorm batch statistics over the GLOBAL batch)
    # and dropout / drop path on: both must not depend on the device count.
    config = t._config(train_backbone=True)
    config.model.drop_path_rate = 0.2
    config.model.drop_rate = 0.1
    # Adam turns gradients near 0 into +-1 updates, which would amplify the
    # float noise of a different reduction order; a larger eps keeps the
    # comparison about the step, not about that noise.
    config.eps = 1e-3
    out = {{}}
    import time
    batches = [t._batch(8, seed=s) for s in (1, 2)]
    # One initialization (one compilation), placed on each mesh in turn.
    variables = jax.device_get(t._init_variables(config))
    for name, devices in (('one', jax.devices()[:1]), ('four', jax.devices())):
      mesh = parallel.make_mesh(devices)
      model, tx, state, step = t._setup(config, mesh, variables)
      losses = []
      t0 = time.time()
      for b in batches:
        gb = parallel.global_batch(b, mesh)
        assert len(gb['image'].sharding.device_set) == len(devices)
        state, m = step(state, gb)
        losses.append(float(m['loss']))
      assert len(state.params['lifter']['head_1']['kernel'].sharding.device_set) == len(devices)
      print(name, 'seconds', time.time() - t0, file=sys.stderr)
      out[name] = dict(losses=losses, grad_norm=float(m['grad_norm']),
                       params=[np.asarray(x).ravel().tolist() for x in jax.tree.leaves(
                           jax.device_get(state.variables()))])
    print('RESULT' + json.dumps(out))
''')


def test_four_device_step_equals_one_device_step(tmp_path):
  script = tmp_path / 'multi_device.py'
  script.write_text(_MULTI_DEVICE_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, 'tests')))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                        text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][0]
  out = json.loads(line[len('RESULT'):])
  one, four = out['one'], out['four']
  print(proc.stderr[-500:])
  np.testing.assert_allclose(four['losses'], one['losses'], rtol=1e-5)
  np.testing.assert_allclose(four['grad_norm'], one['grad_norm'], rtol=1e-4)
  assert len(four['params']) == len(one['params'])
  for a, b in zip(four['params'], one['params']):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # the second step moved the parameters away from the first (a real step)
  assert one['losses'][0] != one['losses'][1]
