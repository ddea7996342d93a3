"""The platform a program is compiled for, and its XLA options (``jit``).

A program's platform is that of the devices it is compiled for (its mesh),
not the host's: a TPU or GPU program traced on a CPU host (ahead-of-time
compilation, ``capf-compile``, or a CPU coordinator) must carry no CPU-only
code. ``jit(fun, platform=...)`` traces ``fun`` with ``target_platform()``
set to that platform; the model's CPU-only constructs (the fusion barriers of
``models/materialize.py``) ask it, and the options below are chosen by it.

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

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator

import jax

# XLA's default YNNPACK list (jaxlib 0.10-0.12: dots, convolutions, reductions)
# less the convolutions. Per-program options take full enum names, comma
# separated (XLA_FLAGS' '-individual_convolution' form is refused here).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}

# Programs that run once (initialisation) get LLVM's -O0 on XLA:CPU: a CA-PF
# init (hundreds of threefry draws) compiled in 8 s instead of 59 s on the tiny
# test model; its values match -O3's to float rounding (6e-8), not bit for bit.
RUN_ONCE_CPU_OPTIONS = {"xla_backend_optimization_level": 0}

PLATFORMS = ("cpu", "gpu", "tpu")
# Device and lowering names of the same platforms.
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

_target = contextvars.ContextVar("contextpose_jax_target_platform", default=None)


def canonical(platform: str) -> str:
  """'cpu', 'gpu' or 'tpu' for a device's or a lowering's platform name."""
  name = _ALIASES.get(platform.lower(), platform.lower())
  if name not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}: expected one of {PLATFORMS + tuple(_ALIASES)}")
  return name


def of_devices(devices) -> str:
  """The platform of ``devices`` (a mesh's, or any iterable of devices)."""
  names = {canonical(d.platform) for d in devices}
  if len(names) != 1:
    raise ValueError(f"devices of several platforms in one program: {sorted(names)}")
  return names.pop()


def target_platform() -> str:
  """The platform of the program being traced: the one ``jit`` (or
  ``targeting``) set, else the platform of JAX's default device."""
  return _target.get() or canonical(jax.default_backend())


@contextlib.contextmanager
def targeting(platform: str) -> Iterator[None]:
  """Traces inside this block are for ``platform``."""
  token = _target.set(canonical(platform))
  try:
    yield
  finally:
    _target.reset(token)


def for_platform(platform: str, run_once: bool = False) -> dict[str, Any]:
  """The options for programs that run on ``platform`` ('cpu', 'gpu', 'tpu');
  ``run_once``: a program called once (initialisation), where compile time
  is all that counts."""
  if canonical(platform) != "cpu":
    return {}
  return {**CPU_OPTIONS, **(RUN_ONCE_CPU_OPTIONS if run_once else {})}


def jit(fun: Callable, *, platform: str | None = None, run_once: bool = False,
        **jit_kwargs: Any):
  """``jax.jit`` of ``fun`` for ``platform`` (default: the default device's;
  a mesh's programs pass ``of_devices(mesh.devices.flat)``): traced with
  ``target_platform()`` set to it, compiled with its options (``run_once``:
  see ``for_platform``)."""
  platform = canonical(platform or jax.default_backend())

  @functools.wraps(fun)
  def traced_for_platform(*args, **kwargs):
    with targeting(platform):
      return fun(*args, **kwargs)

  # The program's name in HLO and profiles: the step's, also for a partial.
  traced_for_platform.__name__ = getattr(fun, "__name__", None) or getattr(
      getattr(fun, "func", None), "__name__", "traced_for_platform")
  return jax.jit(traced_for_platform, compiler_options=for_platform(platform, run_once) or None,
                 **jit_kwargs)
