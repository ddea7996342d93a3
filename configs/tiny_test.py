"""A tiny configuration for the end-to-end tests (seconds per run on a CPU)."""
from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.model.backbone_kwargs.width = 4
  config.model.backbone_kwargs.stem_channels = 8
  config.model.embed_dim = 16
  config.model.depth = 1
  config.data.synthetic = dict(num_train=256, num_validation=64, frames_per_video=16, seed=0)
  config.data.num_workers = 1
  config.batch_size = 16
  config.data.eval_batch_size = 32
  config.num_epochs = 2
  config.log_every_steps = 4
  config.checkpoint_every_steps = 4
  return config
