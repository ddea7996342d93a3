"""CA-PF, HRNet-W32 on Human3.6M (official: lr 6.4e-4, batch 512)."""
from configs import default


def get_config():
  return default.get_config()
