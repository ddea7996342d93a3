"""Default hyper-parameters: CA-PF with HRNet-W32 on Human3.6M (the paper's setting).

The official values (`ContextPose/experiments/human36m/human36m.yaml`,
`ContextPose/train.py`): AdamW with torch defaults and weight decay 0.1 on
every lifter parameter, lr 6.4e-4 x 0.99 after every epoch, global batch 512,
frozen COCO backbone in inference mode, flip augmentation (p = 0.5, decided once
per batch), flip test, best checkpoint by validation MPJPE.

Every field can be overridden on the command line, e.g.
`--config.batch_size=256 --config.data.data_dir=/data/tfds`.
"""
import ml_collections

from contextpose_jax.models import defaults


def get_config():
  config = ml_collections.ConfigDict()

  # Global batch size over all devices and hosts; `config.data.batch_size`
  # follows it (an ml_collections reference), so either override works.
  config.batch_size = 512
  config.seed = 42

  # --- model: `contextpose_jax.models.capf.build_model(config.model)` ---
  # The official architecture (every field, with its meaning, is listed in
  # `defaults.default_model_config`): backbone 'hrnet_32' | 'hrnet_48' | 'cpn',
  # dataset 'h36m' | '3dhp', the lifter's sizes, the precision policy.
  config.model = defaults.default_model_config('hrnet_32', 'h36m')
  # Precision policy. The defaults are the parity-exact setting (the official
  # model's outputs to ~1e-6). On GPUs/TPUs train with the fast setting:
  #   --config.model.matmul_precision=default --config.model.lifter_dtype=bfloat16
  #   --config.model.backbone_dtype=bfloat16
  # ('default' lets matmuls use TF32 / bf16 passes; parameters stay float32,
  # LayerNorm/softmax statistics and the 3D output float32). No speed-up on
  # CPUs (docs/benchmarks.md, "Precision policy").

  # Pretrained backbone: a converter output directory (weights_conversion)
  # whose params/batch_stats hold a 'backbone' entry (e.g. COCO HRNet-W32).
  # Required for real training unless `model.train_backbone` is True.
  config.backbone_init = ''
  # A backbone trained from scratch (train_backbone, no backbone_init): 'he'
  # re-draws its conv kernels with He init; 'official' keeps normal(0.001).
  config.backbone_scratch_init = 'he'

  # --- data: `contextpose_jax.data.pipeline` ---
  config.data = ml_collections.ConfigDict()
  config.data.name = 'human36m'  # TFDS name
  config.data.data_dir = ''  # '' = TFDS default (TFDS_DATA_DIR or ~/tensorflow_datasets)
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.batch_size = config.get_ref('batch_size')
  config.data.eval_batch_size = 512  # global; any size (the last batch is padded)
  config.data.flip_augmentation = True  # H36M: p = 0.5; 3DHP trains without
  config.data.flip_prob = 0.5
  config.data.flip_per_example = False  # official: one coin per batch
  config.data.eval_valid_only = True  # 3DHP: evaluate the valid frames only
  config.data.backbone = ''  # image normalisation; '' = model.backbone's
  config.data.num_workers = 8  # threads decoding batches
  config.data.prefetch = 2  # batches buffered ahead
  config.data.worker_processes = 0  # >0: batches made in that many processes
  config.data.shuffle_seed = 0
  config.data.build_if_missing = False  # only the synthetic set is built on use

  # --- optimizer (torch AdamW defaults) and schedule ---
  config.learning_rate = 6.4e-4  # 3.2e-4 for CPN
  config.lr_decay = 0.99  # multiplied after every epoch
  config.weight_decay = 0.1
  config.b1 = 0.9
  config.b2 = 0.999
  config.eps = 1e-8
  config.grad_clip_norm = 0.0  # 0 = off (the official default)
  config.num_epochs = 100  # the official loop runs until stopped (n_epochs 9999)
  config.steps_per_epoch = -1  # -1: the official epoch, ceil(train examples / global batch)

  # --- divergence (contextpose_jax/divergence.py): the run stops with one
  # line, and nothing diverged is checkpointed, on the first of: ---
  config.divergence = ml_collections.ConfigDict()
  # this many consecutive steps with a non-finite loss (each one skipped); 0 = off
  config.divergence.max_nonfinite_steps = 5
  # a step's loss above this (mm; a fresh lifter starts near 500 mm); 0 = off
  config.divergence.max_loss_mm = 1e5
  # a step's global gradient norm above this; 0 = off (the default: Adam
  # normalizes its steps, so a large gradient alone does not diverge)
  config.divergence.max_grad_norm = 0.0

  # --- evaluation ---
  config.flip_test = True
  config.eval_every_epochs = 1
  config.eval_only = False
  # Eval-only / warm start: a converter output directory or a training workdir.
  config.init_from = ''
  config.save_predictions = True  # WORKDIR/predictions.npz

  # --- bookkeeping ---
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.max_checkpoints_to_keep = 2

  return config


def metrics():
  return ['train/loss_mm', 'eval/mpjpe', 'eval/p_mpjpe']
