"""``python -m contextpose_jax.predict``: the ``capf-predict`` command."""
import sys

from contextpose_jax.predict.cli import main

if __name__ == "__main__":
  sys.exit(main())
