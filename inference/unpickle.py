"""A pickle loader that only builds the objects a caller has named in advance.

`pickle.load` on an untrusted file runs whatever callable the file names (`os.system`,
`builtins.eval`, …).  Every callable or class a pickle uses is looked up through
`Unpickler.find_class`, so refusing everything outside an allow-list there is enough to keep a
hostile file from running code: the refusal happens before anything is called.

An allowed global is not always safe with any argument, though.  numpy's `dtype` rebuilt from a
crafted state (object fields, a subarray, odd flags) and then fed to numpy's `scalar` makes numpy
read the scalar's bytes as object pointers: a segmentation fault, or worse.  So numpy's two
reconstructors are never called on a file's content: `STAND_INS` replaces them with versions that
accept only the plain numeric scalars a real file holds (fc-infos.pkl's `best_val_score`, a float64)
and build them from a dtype of our own making.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
from collections.abc import Set
from pathlib import Path
from typing import Any

import numpy as np

from inference.errors import WeightsCorrupt

#: (module, name) of a global, spelled the Python 3 way (`builtins`, `copyreg`).
Global = tuple[str, str]


def python3_name(module: str, name: str) -> Global:
    """The Python 3 spelling of a global a Python 2 pickle names (`__builtin__` → `builtins`).

    The stock unpickler does this renaming inside `find_class`; doing it before the allow-list
    check means the name we check is exactly the name we import.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class Refused(ValueError):
    """Content a stand-in will not build; `load_pickle` turns it into `WeightsCorrupt`."""


#: The numpy scalar types a stand-in builds: bool, integers and floats, by their pickled code.
PLAIN_DTYPE_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})
_BYTE_ORDERS = frozenset({"<", ">", "|", "="})


class PlainDtype:
    """Stands in for `numpy.dtype` while unpickling.

    numpy pickles a dtype as `dtype(code, align, copy)` followed by a state tuple.  Only a plain
    code is accepted, and only the state numpy writes for one: (3, byte order, no subarray, no
    names, no fields, -1, -1, flags 0).  The real dtype is made here, from the code and the byte
    order alone, so nothing else in the file reaches numpy.
    """

    def __init__(self, code: object, align: object = False, copy: object = True) -> None:
        if not (isinstance(code, str) and code in PLAIN_DTYPE_CODES):
            raise Refused(f"a numpy dtype {code!r} (only plain numbers are allowed)")
        if align not in (0, False) or copy not in (0, 1, False, True):
            raise Refused(f"a numpy dtype with align={align!r}, copy={copy!r}")
        self.code = code
        #: Set by `__setstate__` once the state is checked: a stand-in made any other way (for
        #: instance through copyreg._reconstructor, skipping `__init__`) is never used.
        self.dtype: np.dtype | None = None

    def __setstate__(self, state: object) -> None:
        if not (
            isinstance(state, tuple)
            and len(state) == 8
            and state[0] == 3
            and state[1] in _BYTE_ORDERS
            and state[2:5] == (None, None, None)
            and state[5:] == (-1, -1, 0)
            and hasattr(self, "code")
        ):
            raise Refused(f"a numpy dtype with the state {str(state)[:80]} (only plain numbers are allowed)")
        self.dtype = np.dtype(self.code).newbyteorder("=" if state[1] == "|" else state[1])


def plain_scalar(dtype: object, data: object = None) -> np.generic:
    """Stands in for numpy's `scalar(dtype, data)`: a checked `PlainDtype` and exactly its bytes.

    Python 2 pickles carry the bytes as a str (read as latin-1, which maps them one to one).
    """
    if not isinstance(dtype, PlainDtype) or getattr(dtype, "dtype", None) is None:
        raise Refused("a numpy scalar whose dtype is not a checked plain dtype")
    raw = data.encode("latin-1") if isinstance(data, str) else data
    if not isinstance(raw, bytes) or len(raw) != dtype.dtype.itemsize:
        raise Refused(f"a numpy {dtype.code} scalar whose data is not {dtype.dtype.itemsize} bytes")
    return np.frombuffer(raw, dtype=dtype.dtype)[0]


#: Allowed globals that are never imported: what is built in their place.
STAND_INS: dict[Global, Any] = {
    ("numpy", "dtype"): PlainDtype,
    ("numpy.core.multiarray", "scalar"): plain_scalar,
    ("numpy._core.multiarray", "scalar"): plain_scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, allowed: Set[Global], source: str) -> None:
        super().__init__(file, encoding="latin1")
        self._allowed = frozenset(allowed)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        resolved = python3_name(module, name)
        if resolved not in self._allowed:
            raise WeightsCorrupt(
                f"{self._source} refers to {module}.{name}, which is not allowed in this file; "
                "refusing to load it"
            )
        if resolved in STAND_INS:
            return STAND_INS[resolved]
        return super().find_class(*resolved)

    def persistent_load(self, pid: Any) -> Any:
        raise WeightsCorrupt(f"{self._source} uses persistent ids, which this file never has")


def load_pickle(source: str | os.PathLike[str] | bytes, allowed: Set[Global]) -> object:
    """Unpickle `source` (a path or the bytes themselves) allowing only the globals in `allowed`.

    Raises `WeightsCorrupt` for a refused global and for anything that is not a readable pickle;
    `WeightsMissing` is left to the caller (a missing path raises `FileNotFoundError`).
    """
    if isinstance(source, bytes):
        name, stream = "pickle data", io.BytesIO(source)
    else:
        name, stream = Path(source).name, open(source, "rb")  # closed by the `with` below
    with stream:
        try:
            return RestrictedUnpickler(stream, allowed, name).load()
        except WeightsCorrupt:
            raise
        except Refused as error:
            raise WeightsCorrupt(f"{name} holds {error}; refusing to load it") from None
        except Exception as error:  # a damaged pickle can fail in many ways; all mean "corrupt"
            raise WeightsCorrupt(f"{name} is not a readable pickle ({type(error).__name__}: {error})") from error
