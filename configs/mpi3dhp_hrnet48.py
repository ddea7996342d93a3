"""CA-PF, HRNet-W48 on MPI-INF-3DHP (C = 96; otherwise as mpi3dhp_hrnet32)."""
from configs import mpi3dhp_hrnet32
from contextpose_jax.models import defaults


def get_config():
  config = mpi3dhp_hrnet32.get_config()
  config.model = defaults.default_model_config('hrnet_48', '3dhp')  # C = 96
  return config
