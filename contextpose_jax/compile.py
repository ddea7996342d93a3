r"""Compiles CA-PF's training and evaluation programs for a TPU slice or GPUs, here.

    capf-compile --config=configs/h36m_hrnet32.py --topology=v5e:2x4
    capf-compile --config=configs/h36m_hrnet32.py --topology=v5e-32 \
        --config.model.matmul_precision=default --config.model.lifter_dtype=bfloat16 \
        --config.model.backbone_dtype=bfloat16
    capf-compile --config=configs/h36m_cpn.py --platform=cuda --num_devices=8 --json

Know whether a config fits a slice before renting it. The production training
step and the evaluation / predict step are built as a training run builds
them, at the config's global batches and precision policy, and compiled by
XLA's TPU compiler (needs libtpu: the `tpu` extra) or its GPU compiler for an
H100 (needs a CUDA plugin: the `cuda12` / `cuda13` extras; without one the
programs are lowered only) on this machine, with no accelerator attached.

Prints one table: memory per device against the chip's HBM, FLOPs and bytes
per step from XLA's cost analysis, the step time, examples/s and Human3.6M
epoch time these imply at --peak_fraction of the chip's peak, and the compile
time. For GPUs the FLOPs and bytes are the unfused program's (XLA:GPU has no
cost analysis of a compiled program), and there is no step time. `--json`
prints the same as JSON; `--hlo=DIR` writes each program's optimized HLO. A
program that does not fit is one line `error: ...` and exit status 1; a bad
command line, status 2.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from contextpose_jax import cli
from contextpose_jax import paths

def _flag_values(argv: Sequence[str]) -> flags.FlagValues:
  """This command's flags, new for every parse: ml_collections finds the
  `--config.FIELD` overrides in the argv it is given when the flag is made."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "Training configuration file: a path, or the name of a shipped "
      "config (e.g. configs/h36m_hrnet32.py); --config.FIELD=VALUE overrides as for "
      "capf-train.", flag_values=fv, lock_config=True, sys_argv=["capf-compile", *argv])
  flags.DEFINE_string("topology", None, "A TPU slice: v5e-8, v5p-8, v5e-32, ... or a libtpu "
                      "topology GEN:SHAPE (v5e:2x4, v5p:2x2x1, v4:2x2x1, v6e:4x4).",
                      flag_values=fv)
  flags.DEFINE_string("platform", None, "'cuda': compile for H100 GPUs (--num_devices).",
                      flag_values=fv)
  flags.DEFINE_integer("num_devices", 1, "GPUs of one host (with --platform=cuda).",
                       flag_values=fv)
  flags.DEFINE_float("peak_fraction", 0.5, "Fraction of the chip's peak FLOP/s and HBM "
                     "bandwidth the estimates assume.", flag_values=fv)
  flags.DEFINE_bool("json", False, "Print the report as JSON.", flag_values=fv)
  paths.define_path("hlo", None, "Write each compiled program's optimized HLO to this "
                    "directory (created).", flag_values=fv)
  return fv


def _parse(argv: Sequence[str]):
  argv = cli.resolve_config_arg(list(argv))
  fv = _flag_values(argv)
  try:
    cli.parse(fv, argv, __doc__)
    if fv.config is None:
      raise cli.error("--config is required (e.g. --config=configs/h36m_hrnet32.py)")
    fv.config.keys  # pylint: disable=pointless-statement  # raises if it failed to load
  except (AttributeError, KeyError) as e:  # --config.typo=...: a field the config lacks
    raise cli.error(f"a --config. override names a field the config does not have ({e})"
                    ) from None
  except OSError as e:  # the config file itself
    raise cli.error(cli.config_file_error(argv, e)) from None
  paths.expand_config(fv.config)
  if not 0 < fv.peak_fraction <= 1:
    raise cli.error(f"--peak_fraction={fv.peak_fraction}: must be in (0, 1]")
  return cli.values(fv)


def main(argv: Sequence[str] | None = None) -> int:
  """``capf-compile``: 0 when every program fits, 1 when one does not or the
  target cannot be compiled for, 2 for a bad command line."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = _parse(argv)
  except cli.Exit as e:
    return e.code
  # This host only traces: its own backend is the CPU, whatever is attached
  # (the TPU and GPU compilers run through their compile-only devices).
  import jax  # pylint: disable=g-import-not-at-top
  if "JAX_PLATFORMS" not in os.environ and jax.config.jax_platforms != "cpu":
    jax.config.update("jax_platforms", "cpu")
  from contextpose_jax import aot  # pylint: disable=g-import-not-at-top
  from contextpose_jax import config_validation  # pylint: disable=g-import-not-at-top
  config = args.config
  try:
    target = aot.resolve_target(args.topology, args.platform, args.num_devices)
    config_validation.check_fields(config, target.num_devices)
    reports = aot.compile_programs(config, target, keep_hlo=bool(args.hlo))
  except (aot.TargetError, config_validation.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Exception as e:  # pylint: disable=broad-except
    line = aot.out_of_memory_line(e, target) if "target" in locals() else None
    if line is None:
      raise
    print(f"error: {line}", file=sys.stderr)
    return 1
  data = aot.summary(config, target, reports, args.peak_fraction)
  if args.hlo:
    os.makedirs(args.hlo, exist_ok=True)
    for report in reports:
      with open(os.path.join(args.hlo, aot.hlo_file_name(report)), "w") as f:
        f.write(report.hlo)
  print(json.dumps(data, indent=2) if args.json else aot.format_table(data))
  problems = aot.failures(data)
  for line in problems:
    print(f"error: {line}", file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
