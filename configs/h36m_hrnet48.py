"""CA-PF, HRNet-W48 on Human3.6M (official: lr 6.4e-4, batch 512)."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.backbone = 'hrnet_48'
  return config
