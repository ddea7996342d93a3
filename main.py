r"""Trains and evaluates Context-Aware PoseFormer (CA-PF): `python main.py --help`.

The flags and the entry point live in `contextpose_jax/main.py` (also installed
as the `capf-train` command); this file lets a checkout run without installing.
"""
from contextpose_jax import main as capf_main

if __name__ == '__main__':
  capf_main.run()
