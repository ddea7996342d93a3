"""The CLI's one error type: bad user input, one line naming the file, flag or field."""
from __future__ import annotations

import contextlib


class InputError(ValueError):
  """Bad user input; the message names the file / flag / field."""


@contextlib.contextmanager
def as_input_error(*errors):
  """Turns the library's one-line errors into the CLI's InputError."""
  try:
    yield
  except errors as e:
    raise InputError(str(e)) from e
