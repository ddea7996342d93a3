"""Tiny model directories of every accepted layout, built without training.

A training workdir is written the way `checkpoints.Checkpoints` writes it
during training (`config.json`, `best/<step>/variables`,
`checkpoints/<step>/state`), from two different sets of variables so a test
can tell which checkpoint was loaded; a converter output holds the best one.
"""
import os

import cv2
import jax
import ml_collections
import numpy as np

from configs import tiny_test
from contextpose_jax import checkpoints
from contextpose_jax import fileio
from contextpose_jax import steps
from contextpose_jax.models import capf

SMALL_HRNET = dict(width=4, stage_modules=[1, 1, 1], num_blocks=1, stem_channels=8,
                   layer1_blocks=1)


def small_config():
  config = tiny_test.get_config()
  config.model.backbone_kwargs = ml_collections.ConfigDict(SMALL_HRNET)
  config.model.embed_dim = 16
  config.model.depth = 1
  return config


def _perturbed(variables, seed):
  """The same tree with the lifter's params moved (a 'later' checkpoint)."""
  rng = np.random.default_rng(seed)
  def move(path, x):
    if any(getattr(k, 'key', None) == 'lifter' for k in path):
      return np.asarray(x) + rng.normal(0, 0.05, np.shape(x)).astype(np.asarray(x).dtype)
    return np.asarray(x)
  return jax.tree_util.tree_map_with_path(move, variables)


def make_workdir(workdir: str, *, best_step=3, latest_step=5, with_best=True):
  """Returns (best variables, latest variables, config)."""
  config = small_config()
  model = capf.build_model(config.model)
  best = jax.tree_util.tree_map(np.asarray, steps.init_variables(model, 0))
  latest = _perturbed(best, 1)
  os.makedirs(workdir)
  fileio.write_text_atomic(os.path.join(workdir, checkpoints.CONFIG_FILE),
                           config.to_json_best_effort(indent=2))
  tx = steps.make_optimizer(config)
  ckpts = checkpoints.Checkpoints(workdir)
  if with_best:
    state = steps.create_train_state(config, model, best, tx).replace(step=best_step)
    ckpts.save_evaluated(state, 100.0, {'epoch': 1})
  state = steps.create_train_state(config, model, latest, tx).replace(step=latest_step)
  ckpts.save_latest(state, {'epoch': 2})
  ckpts.wait()
  ckpts.close()
  return best, latest, config


def write_video(path, frames, fps=10.0):
  """RGB frames -> an mp4v video (the frames' own size)."""
  h, w = frames[0].shape[:2]
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), fps, (w, h))
  assert writer.isOpened()
  for f in frames:
    writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
  writer.release()


def decoded(path):
  """Every frame of a video, RGB."""
  capture = cv2.VideoCapture(str(path))
  out = []
  while True:
    ok, f = capture.read()
    if not ok:
      return out
    out.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
