"""The project's one command-line library: absl flags, one line per error.

`main.py` (training) uses absl through `app.run`, because ml_collections'
`--config` flags are absl flags. The other commands (`capf-predict`,
`capf-convert`, `capf-build-dataset`, the benchmarks) are also called from
Python (tests call `main([...])`), so:

Each CLI defines its flags on its own `flags.FlagValues()` (so several CLIs can
be imported in one process without duplicate-flag errors) and parses with
`parse`, which a `main(argv=None) -> int` can call again and again (tests):

  _FLAGS = flags.FlagValues()
  flags.DEFINE_integer('num_workers', 1, '...', flag_values=_FLAGS)

  def main(argv=None) -> int:
    try:
      positional = cli.parse(_FLAGS, argv, __doc__)
    except cli.Exit as e:
      return e.code
    ...
"""
from __future__ import annotations

import os
import re
import sys
import types
from typing import Sequence

from absl import flags

import configs
from contextpose_jax import paths

# The configuration files shipped in the `configs` package (they import each
# other as `configs.*`, so the package must be importable: from a checkout or
# after `pip install`).
CONFIGS_DIR = os.path.dirname(os.path.abspath(configs.__file__))

HELP = ('--help', '-h', '-?', '--helpfull', '--helpshort')


class Exit(SystemExit):
  """Help was printed (code 0) or the command line was rejected (code 2).

  A SystemExit, so uncaught it ends the program with that status.
  """


def usage(flag_values: flags.FlagValues, doc: str) -> str:
  """`doc`, then every flag of `flag_values` with its help and default."""
  lines = []
  for module, module_flags in flag_values.flags_by_module_dict().items():
    if module == 'absl.flags':  # --flagfile / --undefok: not ours to advertise
      continue
    del module_flags
    lines += flag_values.module_help(module).strip().splitlines()[1:]  # drop `module:`
  return f'{(doc or "").strip()}\n\nflags:\n' + '\n'.join(lines)


# absl's wording for a required flag left out.
_REQUIRED = re.compile(r'flag --(\w+)=None: Flag --\w+ must have a value other than None\.')


def one_line(message: str) -> str:
  """An error message on one line; absl's required-flag wording becomes
  `--NAME is required` (`--A and --B are required`)."""
  line = ' '.join(str(message).split())
  missing = [f'--{name}' for name in _REQUIRED.findall(line)]
  if missing and not _REQUIRED.sub('', line).strip():
    line = (f'{missing[0]} is required' if len(missing) == 1 else
            f'{", ".join(missing[:-1])} and {missing[-1]} are required')
  return line


def error(message: str) -> Exit:
  """A rejected command line: prints one line `error: ...` on stderr and
  returns the `Exit` (status 2) to raise."""
  print(f'error: {one_line(message)}', file=sys.stderr)
  return Exit(2)


def shipped_configs() -> list[str]:
  """The configuration files shipped in `configs/`, as `configs/NAME.py`."""
  return sorted(f'configs/{name}' for name in os.listdir(CONFIGS_DIR)
                if name.endswith('.py') and name != '__init__.py')


def config_file_error(argv: Sequence[str], error_: BaseException) -> str:
  """One line for a `--config` file that cannot be loaded; a path that does
  not exist gets the list of the shipped configs."""
  arg = ([a for a in argv if a.startswith('--config=')] or ['--config'])[-1]
  path = arg.partition('=')[2].partition(':')[0]
  if path and not os.path.exists(path):
    return (f'{arg}: cannot load the config file (no such file); the shipped configs: '
            f'{", ".join(shipped_configs())}')
  lines = [l.strip() for l in str(error_.__cause__ or error_).splitlines() if l.strip()]
  return f'{arg}: cannot load the config file ({lines[-1] if lines else error_})'


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None,
          doc: str) -> list[str]:
  """Parses `argv` (no program name; None: sys.argv[1:]) into `flag_values`.

  Every flag starts from its default, so repeated calls do not leak values.
  Returns the positional arguments. Raises `Exit` after printing the help
  (`--help`, status 0) or one `error: ...` line (a bad flag, status 2).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  flags_part = argv[:argv.index('--')] if '--' in argv else argv
  if any(a in HELP for a in flags_part):
    print(usage(flag_values, doc))
    raise Exit(0)
  flag_values.unparse_flags()
  try:
    return flag_values(['cli', *argv])[1:]
  except flags.Error as e:
    raise error(str(e)) from None


def values(flag_values: flags.FlagValues) -> types.SimpleNamespace:
  """The parsed flags as attributes (a mutable copy, like argparse's)."""
  return types.SimpleNamespace(**flag_values.flag_values_dict())


def resolve_config_arg(argv: Sequence[str]) -> list[str]:
  """`--config=configs/NAME.py` names the shipped config when no such file
  exists relative to the working directory (e.g. after `pip install`);
  `~` and `$VARS` in a config path are expanded."""
  out = []
  for arg in argv:
    if arg.startswith('--config='):
      path, sep, overrides = arg[len('--config='):].partition(':')
      if path.startswith('~') or '$' in path:  # else kept as typed, for errors
        path = paths.expand(path)
        arg = f'--config={path}{sep}{overrides}'
      shipped = os.path.join(CONFIGS_DIR, os.path.basename(path))
      if not os.path.exists(path) and os.path.isfile(shipped):
        arg = f'--config={shipped}{sep}{overrides}'
    out.append(arg)
  return out
