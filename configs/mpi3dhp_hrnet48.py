"""CA-PF, HRNet-W48 on MPI-INF-3DHP (C = 96; otherwise as mpi3dhp_hrnet32)."""
from configs import mpi3dhp_hrnet32


def get_config():
  config = mpi3dhp_hrnet32.get_config()
  config.model.backbone = 'hrnet_48'
  config.model.embed_dim = 96
  return config
