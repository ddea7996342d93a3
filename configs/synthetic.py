"""The embedded default: CA-PF on the download-free `synthetic_human36m` set.

Small enough to build the data, train and evaluate on 2 CPU cores in about
3 minutes (docs/training.md). No COCO weights exist for the synthetic images, so a tiny HRNet
backbone is trained from scratch together with the lifter
(`model.train_backbone`). Everything else (loss, AdamW, flip augmentation,
flip test, metrics, checkpoints) is the Human3.6M recipe.

  capf-train --config=configs/synthetic.py --workdir=/tmp/capf_synthetic
  # the context-free baseline (same lifter, no image context):
  capf-train --config=configs/synthetic.py --workdir=/tmp/capf_synthetic_noctx \
      --config.model.use_context=False
"""
from configs import default

# The synthetic set of the quick start, and the default of
# `capf-build-dataset synthetic_human36m` (data_prep/synthetic.py): one
# source, so a set built first with the builder is the one training asks for.
SYNTHETIC_NAME = 'synthetic_human36m'
SYNTHETIC_OPTIONS = dict(num_train=8192, num_validation=1024, frames_per_video=64, seed=0)


def get_config():
  config = default.get_config()
  config.model.backbone = 'hrnet_32'
  config.model.backbone_kwargs.width = 4
  config.model.backbone_kwargs.stage_modules = (1, 1, 1)
  config.model.backbone_kwargs.num_blocks = 1
  config.model.backbone_kwargs.stem_channels = 8
  config.model.backbone_kwargs.layer1_blocks = 1
  config.model.train_backbone = True
  config.model.embed_dim = 32
  config.model.depth = 2
  config.model.drop_path_rate = 0.0

  config.data.name = SYNTHETIC_NAME
  config.data.build_if_missing = True
  config.data.num_workers = 2
  config.data.synthetic = dict(SYNTHETIC_OPTIONS)
  config.batch_size = 32
  config.data.eval_batch_size = 128
  config.learning_rate = 2e-3
  config.lr_decay = 0.95
  config.num_epochs = 1
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  return config
