"""CA-PF, CPN50 on Human3.6M (official: lr 3.2e-4, batch 256)."""
from configs import default


def get_config():
  config = default.get_config()
  config.model.backbone = 'cpn'
  config.batch_size = 256
  config.data.eval_batch_size = 256
  config.learning_rate = 3.2e-4
  return config
