"""XLA options for the model's compiled programs (``jit``).

XLA:CPU hands convolutions to YNNPACK by default. On CA-PF's convolutions
(HRNet's and CPN's 3x3 and strided convs, NHWC, batch 1-64) that path ran
1.2-2x slower than XLA's own Eigen convolutions on a 2-core AVX-512 CPU, in
float32 and in bfloat16, and 1.2-2.4x slower on 5 or 6 of the 6 shapes
(two runs) on a 2-core AVX2 one (``python -m benchmarks.speed --rows=conv``
measures both), so the backbone's programs turn it off. Dots keep the
default: there the two paths were level. Options apply per program, not
process-wide: JAX code of the user's own is left as it is, and the
persistent compilation cache keys on them. Other platforms get no options.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

# XLA's default YNNPACK list (jaxlib 0.10.2: dots, convolutions, reductions)
# less the convolutions. Per-program options take full enum names, comma
# separated (XLA_FLAGS' '-individual_convolution' form is refused here).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def for_platform(platform: str) -> dict[str, str]:
  """The options for programs that run on ``platform`` ('cpu', 'gpu', 'tpu')."""
  return dict(CPU_OPTIONS) if platform == "cpu" else {}


def jit(fun: Callable, *, platform: str | None = None, **jit_kwargs: Any):
  """``jax.jit`` with the options of ``platform`` (default: JAX's default
  backend; a mesh's programs pass its devices' platform)."""
  options = for_platform(platform or jax.default_backend())
  return jax.jit(fun, compiler_options=options or None, **jit_kwargs)
