"""The project's one command-line library: absl flags, one line per error.

`main.py` (training) uses absl through `app.run`, because ml_collections'
`--config` flags are absl flags. The other commands (`capf-predict`,
`capf-convert`, `capf-build-dataset`, the benchmarks) define their flags on a
module-private `flags.FlagValues`, so importing several of them in one process
(tests do) never collides, and parse with `parse` below, so `main(argv)` stays
an ordinary function that tests call with a list.
"""
from __future__ import annotations

import re
import sys
import textwrap
from typing import Sequence

from absl import flags

HELP_FLAGS = ('-h', '--help', '--helpshort', '--helpfull')


def usage(flag_values: flags.FlagValues, prog: str, doc: str) -> str:
  flag_text = flag_values.get_help(include_special_flags=False)
  return f'{textwrap.dedent(doc).strip()}\n\nusage: {prog} [flags]\n\n{flag_text}\n'


def parse(flag_values: flags.FlagValues, argv: Sequence[str] | None, *, prog: str,
          doc: str, max_positional: int = 0) -> list[str]:
  """Parses `argv` (default: `sys.argv[1:]`) into `flag_values`.

  Returns the positional arguments. `--help` prints the usage and raises
  SystemExit(0); a usage error prints ONE line `error: ...` and raises
  SystemExit(2). Flags parsed by an earlier call are reset first, so a
  second `main([...])` in the same process starts from the defaults.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in HELP_FLAGS for a in argv):
    print(usage(flag_values, prog, doc))
    raise SystemExit(0)
  flag_values.unparse_flags()
  try:
    rest = flag_values([prog, *argv])[1:]
  except flags.Error as e:
    _usage_error(str(e))
  if len(rest) > max_positional:
    _usage_error(f'unexpected argument(s): {" ".join(rest[max_positional:])}')
  return rest


def _usage_error(message: str):
  line = ' '.join(message.split())
  missing = re.fullmatch(r'flag --(\w+)=None: Flag --\w+ must have a value other than None\.',
                         line)
  if missing:
    line = f'--{missing.group(1)} is required'

  print(f'error: {line} (see --help)', file=sys.stderr)
  raise SystemExit(2)
