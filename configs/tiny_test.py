"""A tiny configuration for the end-to-end tests (about a minute on a CPU).

The backbone is frozen (random He init, BatchNorm in inference mode) so the
test spends its time on the machinery rather than on XLA:CPU's slow conv
weight gradients; `tests/test_train.py` and `tests/test_multihost.py` cover
the fine-tuned backbone.
"""
from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.model.train_backbone = False
  config.model.embed_dim = 16
  config.model.depth = 1
  config.data.synthetic = dict(num_train=1024, num_validation=64, frames_per_video=16, seed=0)
  config.data.num_workers = 1
  config.batch_size = 16
  config.data.eval_batch_size = 32
  config.learning_rate = 1e-2
  config.num_epochs = 6
  config.log_every_steps = 32
  config.checkpoint_every_steps = 32
  return config
