"""The one reading of a path the user typed: `~` and `$VARS` expanded, absolute.

Shells leave `~` alone after `=` (`--data_dir=~/tensorflow_datasets`), so
without this a command would write into a folder literally named `~` in the
working directory. Every path flag of the commands (`define_path`) and every
path field of a training config (`expand_config`) goes through `expand`.
Stdlib only: the commands parse their flags before any heavy import.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable

from absl import flags

# The config fields that name files or directories (configs/default.py).
CONFIG_FIELDS = ('data.data_dir', 'backbone_init', 'init_from')


def expand(path: str | None) -> str | None:
  """`~` and `$VARS` expanded, made absolute; '' / None and URLs
  (`gs://...`) as given."""
  if not path or '://' in path:
    return path
  return os.path.abspath(os.path.expandvars(os.path.expanduser(path)))


class _PathParser(flags.ArgumentParser):
  """absl parser of a path flag; the words in `keep` (e.g. 'default',
  'off') are values, not paths."""

  def __init__(self, keep: Iterable[str] = ()):
    self._keep = tuple(keep)

  def parse(self, argument):
    if argument is None or argument in self._keep:
      return argument
    return expand(str(argument))

  def flag_type(self):
    return 'path'


def define_path(name: str, default: str | None, help: str,  # pylint: disable=redefined-builtin
                flag_values: flags.FlagValues = flags.FLAGS,
                keep: Iterable[str] = ()):
  """A string flag whose value is `expand`-ed when parsed."""
  # Listed under the calling module in --help, like a flags.DEFINE_* there.
  module = sys._getframe(1).f_globals.get('__name__')  # pylint: disable=protected-access
  if module == '__main__':  # absl's name for it (python -m / a script)
    module = sys.argv[0]
  return flags.DEFINE(_PathParser(keep), name, default, help, flag_values=flag_values,
                      serializer=flags.ArgumentSerializer(), module_name=module)


def expand_config(config) -> None:
  """Expands the path fields of a training config in place."""
  for field in CONFIG_FIELDS:
    *parents, leaf = field.split('.')
    node = config
    for parent in parents:
      node = node.get(parent) if hasattr(node, 'get') else None
      if node is None:
        break
    if node is not None and isinstance(node.get(leaf), str):
      node[leaf] = expand(node[leaf])
