"""A pickle loader that only builds the objects a caller has named in advance.

`pickle.load` on an untrusted file runs whatever callable the file names (`os.system`,
`builtins.eval`, …).  Every callable or class a pickle uses is looked up through
`Unpickler.find_class`, so refusing everything outside an allow-list there is enough to keep a
hostile file from running code: the refusal happens before anything is called.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
from collections.abc import Set
from pathlib import Path
from typing import Any

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
        except Exception as error:  # a damaged pickle can fail in many ways; all mean "corrupt"
            raise WeightsCorrupt(f"{name} is not a readable pickle ({type(error).__name__}: {error})") from error
