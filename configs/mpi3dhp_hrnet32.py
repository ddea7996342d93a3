"""CA-PF, HRNet-W32 on MPI-INF-3DHP (ContextPose_mpi, after P-STMO).

Official: ground-truth 2D input, no deformable blocks, C = 64, AdamW lr 7e-4
x 0.97 per epoch, batch 160, no flip augmentation in training, flip test on;
metrics on the valid frames of TS1-TS6.
"""
from configs import default
from contextpose_jax.models import defaults


def get_config():
  config = default.get_config()
  config.model = defaults.default_model_config('hrnet_32', '3dhp')  # C = 64, no deformable blocks
  config.data.name = 'mpi_inf_3dhp'
  config.data.eval_split = 'test'
  config.data.flip_augmentation = False
  config.batch_size = 160
  config.data.eval_batch_size = 160
  config.learning_rate = 7e-4
  config.lr_decay = 0.97
  # run_3dhp.py: `--nepoch 80` default, loop `range(1, nepoch)` = 79 epochs.
  config.num_epochs = 79
  return config
