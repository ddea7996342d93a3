"""The official epoch (`ContextPose/train.py`: a DataLoader without
`drop_last`) and the official best-epoch rule.

- An epoch is ceil(N / batch) steps over every example once, the last batch
  partial; the lr decays after exactly those steps (against torch's DataLoader
  and the official loop's `lr *= lr_decay`).
- The padded, masked last batch through the production step equals the
  PyTorch reference's step on the real rows alone.
- Several hosts pad their shares of the same global batches; a restart mid-epoch
  gives the same batches; an older checkpoint resumes only where exact.
- `best/` changes only when P1 rounded to 0.1 mm is strictly lower.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import default
from contextpose_jax import checkpoints
from contextpose_jax import parallel
from contextpose_jax import steps
from contextpose_jax import train
from contextpose_jax.data import pipeline
from contextpose_jax.models import capf
from data_prep import synthetic
from tests import fixtures_data
from tests import test_train
from torch_reference import capf as ref_capf

N_TRAIN, BATCH = 24, 10  # 3 steps per epoch: 10, 10 and a partial 4


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('epoch'))
  synthetic.build(d, num_train=N_TRAIN, num_validation=8, frames_per_video=8,
                  image_format='png', examples_per_shard=16, log=lambda *_: None)
  return d


def _config(data_dir, **data):
  config = default.get_config()
  config.data.name = synthetic.NAME
  config.data.data_dir = data_dir
  config.data.batch_size = BATCH
  config.data.num_workers = 1
  config.data.shuffle_seed = 3
  config.data.update(data)
  config.learning_rate, config.lr_decay = 6.4e-4, 0.5
  return config


def _batches(config, n, start_step=0):
  it = pipeline.make_train_iterator(config, seed=3, start_step=start_step)
  return [next(it) for _ in range(n)]


def _ids(batch):
  """Per row: the record's identity (its 2D keypoints, flips undone)."""
  return [tuple(np.round(np.abs(kp).ravel(), 5)) for kp in batch['keypoints_2d']]


def test_epoch_steps_and_lr_schedule_equal_the_official_loop(data_dir):
  config = _config(data_dir, flip_augmentation=False)
  # The official loop: a DataLoader without drop_last, lr *= decay per epoch.
  loader = torch.utils.data.DataLoader(list(range(N_TRAIN)), batch_size=BATCH, shuffle=True)
  opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
  official = []
  for _ in range(3):
    official += [(len(b), opt.param_groups[0]['lr']) for b in loader]
    for group in opt.param_groups:
      group['lr'] *= config.lr_decay
  assert [n for n, _ in official[:3]] == [10, 10, 4]

  spe = train.steps_per_epoch(config)
  assert spe == train.data_epoch_steps(config) == len(loader) == 3
  lr_fn = steps.learning_rate_fn(config, spe)
  batches = _batches(config, 3 * spe)
  ours = [(int(b['mask'].sum()), float(lr_fn(s))) for s, b in enumerate(batches)]
  assert [n for n, _ in ours] == [n for n, _ in official]
  np.testing.assert_allclose([lr for _, lr in ours], [lr for _, lr in official], rtol=1e-6)

  records = {_ids({'keypoints_2d': e['keypoints_2d'][None]})[0] for e in
             fixtures_data.read_split(synthetic.NAME, 'train', data_dir)}
  orders = []
  for epoch in range(3):
    rows = [r for b in batches[3 * epoch:3 * epoch + 3]
            for r, m in zip(_ids(b), b['mask']) if m]
    assert len(rows) == N_TRAIN and set(rows) == records  # every example once
    orders.append(rows)
    pad = batches[3 * epoch + 2]
    assert pad['image'].shape[0] == BATCH and list(pad['mask']) == [1] * 4 + [0] * 6
    assert np.all(np.isfinite(pad['image'])) and np.all(np.isfinite(pad['keypoints_3d']))
  assert orders[0] != orders[1]  # reshuffled every epoch


def test_hosts_pad_their_shares_and_restarts_are_exact(data_dir, monkeypatch):
  config = _config(data_dir, flip_per_example=True)
  single = _batches(config, 7)
  per_host = []
  for host in range(2):
    monkeypatch.setattr(pipeline, '_process_info', lambda h=host: (h, 2))
    per_host.append(_batches(config, 7))
  monkeypatch.setattr(pipeline, '_process_info', lambda: (0, 1))
  for step, (a, b, want) in enumerate(zip(*per_host, single)):
    assert a['image'].shape[0] == b['image'].shape[0] == BATCH // 2
    for key in want:  # the hosts' rows, in process order, are the global batch
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), want[key],
                                    err_msg=f'step {step} {key}')
  # The partial batch: host 0 holds the 4 real rows and a padding row, host 1
  # only padding (it still runs the step).
  assert list(per_host[0][2]['mask']) == [1, 1, 1, 1, 0]
  assert list(per_host[1][2]['mask']) == [0] * 5
  # A restart at the partial batch, and one mid-way through the next epoch.
  for start in (2, 4):
    for want, got in zip(single[start:], _batches(config, 7 - start, start_step=start)):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_older_checkpoint_resumes_only_where_exact(data_dir):
  config = _config(data_dir, flip_augmentation=False)
  spe = train.data_epoch_steps(config)
  train.check_resumable(config, {'step': 4, 'nan_count': 0, 'epoch_steps': spe}, 'w', spe)
  with pytest.raises(train.ResumeError, match=r'^w/checkpoints/4 was written by an older '
                     r'version .* \(2 steps per epoch, now the official 3\)'):
    train.check_resumable(config, {'step': 4, 'nan_count': 0}, 'w/checkpoints/4', spe)
  # N a multiple of the batch: both versions make the same batches.
  config.data.batch_size = 8
  train.check_resumable(config, {'step': 4, 'nan_count': 0}, 'w', 3)
  old = [b['keypoints_2d'] for b in _batches(config, 4)]
  source = fixtures_data.read_split(synthetic.NAME, 'train', data_dir)
  import grain  # the earlier pipeline's order: shuffle(seed).repeat(), batches of 8
  stream = grain.MapDataset.range(N_TRAIN).shuffle(seed=3).repeat()
  for step, got in enumerate(old):
    rows = [stream[step * 8 + k] for k in range(8)]
    want = np.stack([source[i]['keypoints_2d'] for i in rows])
    np.testing.assert_array_equal(got, want)


def _tiny_models(seed=0):
  """The PyTorch reference CA-PF and the production Flax model, same weights."""
  config = test_train._config()
  config.model.drop_path_rate = config.model.drop_rate = config.model.attn_drop_rate = 0.0
  config.learning_rate, config.eps = 1e-3, 1e-3  # eps: see test_train's multi-device test
  torch.manual_seed(seed)
  reference = ref_capf.CAPF('hrnet_32', 'h36m', backbone_kwargs=test_train.TINY_BACKBONE,
                            embed_dim=config.model.embed_dim, depth=config.model.depth)
  with torch.no_grad():  # BatchNorm statistics that are not the identity
    for name, b in reference.backbone.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(torch.randn(b.shape) * 0.1)
      elif name.endswith('running_var'):
        b.copy_(torch.rand(b.shape) + 0.5)
  state_dict = {k: v for k, v in reference.state_dict().items()
                if not k.startswith('backbone.final_layer.')}
  model = capf.build_model(config.model)
  variables = capf.load_torch_state_dict(state_dict, model, config.model, source='test')
  return config, reference, model, variables


def _official_step(reference, optimizer, batch, rows):
  """One iteration of the official loop on `rows` of `batch` alone."""
  pred = reference(*[torch.tensor(batch[k][rows]) for k in steps.MODEL_KEYS])
  loss = torch.mean(torch.norm(pred[:, 0] - torch.tensor(batch['keypoints_3d'][rows]), dim=-1))
  optimizer.zero_grad()
  if not torch.isnan(loss):
    loss.backward()
    optimizer.step()
  return float(loss.detach())


def test_partial_batch_step_equals_the_reference_step_on_its_real_rows():
  config, reference, model, variables = _tiny_models()
  reference.train()
  reference.backbone.eval()  # frozen, as the official `fix_weights`
  for module in reference.modules():  # no dropout / drop path: a deterministic step
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
    elif hasattr(module, 'rate'):
      module.rate = 0.0
  for p in reference.backbone.parameters():
    p.requires_grad_(False)
  optimizer = torch.optim.AdamW([p for p in reference.volume_net.parameters()],
                                lr=config.learning_rate, weight_decay=0.1, eps=config.eps)
  mesh = parallel.make_mesh()
  tx = steps.make_optimizer(config)
  state = jax.device_put(steps.create_train_state(config, model, variables, tx),
                         parallel.replicated(mesh))
  step = steps.make_train_step(model, tx, steps.learning_rate_fn(config, 2), mesh, False)

  full = dict(test_train._batch(4, seed=1), mask=np.ones(4, np.float32))
  partial = test_train._batch(4, seed=2)
  # Rows 0-2 are real; row 3 is padding with a NaN target: out of everything.
  partial['keypoints_3d'][3] = np.nan
  partial['mask'] = np.array([1, 1, 1, 0], np.float32)
  for batch, rows in ((full, slice(0, 4)), (partial, slice(0, 3))):
    want_loss = _official_step(reference, optimizer, batch, rows)
    state, metrics = step(state, parallel.global_batch(batch, mesh))
    np.testing.assert_allclose(float(metrics['loss']), want_loss, rtol=1e-5)
    assert int(metrics['skipped']) == 0 and int(metrics['examples']) == rows.stop
    assert np.isfinite(float(metrics['grad_norm']))
  assert int(state.nan_count) == 0
  want = capf.load_torch_state_dict(
      {k: v for k, v in reference.state_dict().items()
       if not k.startswith('backbone.final_layer.')}, model, config.model, source='test')
  got = jax.device_get(state.variables())
  moved = 0.0
  for (path, a), b, b0 in zip(jax.tree_util.tree_flatten_with_path(got['params']['lifter'])[0],
                              jax.tree.leaves(want['params']['lifter']),
                              jax.tree.leaves(variables['params']['lifter'])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    moved = max(moved, float(np.abs(np.asarray(b) - b0).max()))
  assert moved > 1e-4  # two real AdamW steps


def _state(step):
  return steps.TrainState(step=jnp.asarray(step, jnp.int32), params={'w': jnp.full(2, step)},
                          frozen_params={}, batch_stats={}, opt_state=(),
                          rng=jax.random.PRNGKey(0), nan_count=jnp.zeros((), jnp.int32))


@pytest.mark.parametrize('dataset', ['h36m', '3dhp'])
def test_best_epoch_is_the_official_one(dataset, tmp_path):
  source = fixtures_data.official_source(
      'ContextPose/train.py' if dataset == 'h36m' else 'ContextPose_mpi/run_3dhp.py')
  # The rules as the official loops state them.
  if dataset == 'h36m':
    assert 'mean_p1 = round(np.mean(errors_p1), 1)' in source
    assert 'if mean_p1 < min_loss:' in source
    official_value = lambda p1: round(np.mean(np.float64(p1)), 1)
  else:
    assert 'data_threshold < opt.previous_best_threshold' in source
    official_value = lambda p1: p1
  # Epochs 1 and 2 tie to 0.1 mm (50.0), so do 3 and 4 (49.9); the exact
  # minimum is epoch 4.
  p1 = [50.04, 49.96, 49.94, 49.86, 50.3]
  best, best_epoch = float('inf'), None
  for epoch, value in enumerate(p1, 1):
    if official_value(value) < best:
      best, best_epoch = official_value(value), epoch
  assert best_epoch == (3 if dataset == 'h36m' else 4)

  ckpts = checkpoints.Checkpoints(str(tmp_path))
  kept = [ckpts.save_evaluated(_state(epoch), value, {'epoch': epoch}, dataset)
          for epoch, value in enumerate(p1, 1)]
  assert ckpts.best.best_step() == best_epoch and list(ckpts.best.all_steps()) == [best_epoch]
  assert kept == [e in ((1, 3) if dataset == 'h36m' else (1, 2, 3, 4)) for e in range(1, 6)]
  assert ckpts.best_mpjpe() == p1[best_epoch - 1]
  ckpts.close()
