"""Restricted loading of the legacy pickle inputs (untrusted files).

Several inputs of the builders are pickles, and unpickling runs whatever
callable the file names (`os.system`, ...). These are read here with an
unpickler that resolves only the globals numpy's own pickles need (arrays,
dtypes, scalars), builtin containers and scalars, and refuses everything else
without importing or calling it:

  h36m_train.pkl, h36m_validation.pkl   H36M-Toolbox labels
  camera_data.pkl                       H36M-Toolbox cameras
  data_2d_h36m_cpn_ft_h36m_dbb.npz      VideoPose3D CPN detections (object
                                        array holding a dict)
  data_train_3dhp.npz, data_test_3dhp.npz
                                        P-STMO 3DHP labels (object arrays)

`load(path)` reads a pickle file, `load_npz(path)` an npz whose members may
be object arrays (never through `np.load(allow_pickle=True)`).
"""
from __future__ import annotations

import builtins
import collections
import pickle
import zipfile

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names a global outside the allow-list (nothing was run)."""


def _allowed() -> dict[tuple[str, str], object]:
  core = getattr(np, '_core', None) or np.core  # numpy 2 / numpy 1
  multiarray, numeric = core.multiarray, core.numeric
  allowed = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
             ('collections', 'OrderedDict'): collections.OrderedDict}
  # numpy >= 2 writes numpy._core, numpy 1.x numpy.core; both name the same
  # functions (array reconstruction from bytes, numpy scalars).
  for package in ('numpy.core', 'numpy._core'):
    for module in ('multiarray', '_multiarray_umath'):
      allowed[(f'{package}.{module}', '_reconstruct')] = multiarray._reconstruct  # pylint: disable=protected-access
      allowed[(f'{package}.{module}', 'scalar')] = multiarray.scalar
    allowed[(f'{package}.numeric', '_frombuffer')] = numeric._frombuffer  # pylint: disable=protected-access
  # Builtin types that pickle by name (protocol < 4 for sets; Python 2
  # pickles say __builtin__; bytes in protocol 2 go through _codecs.encode).
  for name in ('set', 'frozenset', 'complex', 'bytearray', 'slice', 'range'):
    allowed[('builtins', name)] = getattr(builtins, name)
    allowed[('__builtin__', name)] = getattr(builtins, name)
  allowed[('_codecs', 'encode')] = _latin1_encode
  return allowed


def _latin1_encode(text, encoding='latin1'):
  """What protocol-2 pickles of bytes call; only the one codec they use."""
  if encoding not in ('latin1', 'latin-1'):
    raise UnsafePickleError(f'_codecs.encode with codec {encoding!r}')
  return text.encode('latin1')


_ALLOWED = None


class RestrictedUnpickler(pickle.Unpickler):
  """An Unpickler that resolves only `_allowed()` globals."""

  def __init__(self, file, where: str):
    # latin1: how numpy reads Python-2 pickles of arrays.
    super().__init__(file, encoding='latin1')
    self._where = where

  def find_class(self, module, name):
    global _ALLOWED
    if _ALLOWED is None:
      _ALLOWED = _allowed()
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f'{self._where}: refused to load the global {module}.{name} (only '
          'numpy arrays, builtin containers and scalars are allowed in this '
          'file)') from None

  def persistent_load(self, pid):
    raise UnsafePickleError(f'{self._where}: refused a persistent id')


def loads_from(file, where: str):
  """Unpickles one object from an open binary file."""
  return RestrictedUnpickler(file, where).load()


def load(path: str):
  """The object pickled in the file `path` (restricted; see the module doc).

  Raises UnsafePickleError for a refused global, pickle.UnpicklingError /
  EOFError / ValueError for a corrupt file and OSError if it cannot be read.
  """
  with open(path, 'rb') as f:
    return loads_from(f, path)


def _read_npy_member(f, where: str) -> np.ndarray:
  fmt = np.lib.format
  version = fmt.read_magic(f)
  if version == (1, 0):
    shape, fortran, dtype = fmt.read_array_header_1_0(f)
  elif version == (2, 0):
    shape, fortran, dtype = fmt.read_array_header_2_0(f)
  else:
    raise ValueError(f'{where}: unsupported .npy format version {version}')
  if not dtype.hasobject:
    array = np.frombuffer(f.read(), dtype=dtype,
                          count=int(np.prod(shape, dtype=np.int64)))
    order = 'F' if fortran else 'C'
    return array.reshape(shape, order=order).copy()
  # Object arrays are stored as a pickle of the whole array.
  array = loads_from(f, where)
  if not isinstance(array, np.ndarray):
    raise ValueError(f'{where}: object member is a {type(array).__name__}, '
                     'not an array')
  return array


def load_npz(path: str) -> dict[str, np.ndarray]:
  """{member name: array} of an .npz; object members unpickled restrictedly."""
  out = {}
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise ValueError(f'{path}: not an npz archive ({e})') from None
  with archive:
    for member in archive.namelist():
      if not member.endswith('.npy'):
        continue
      where = f'{path}[{member[:-4]!r}]'
      with archive.open(member) as f:
        out[member[:-4]] = _read_npy_member(f, where)
  return out
