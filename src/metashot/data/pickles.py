"""Pickles read without running code: numpy arrays and plain builtins only.

The benchmarks' pickles (miniImageNet, tieredImageNet, CIFAR-FS, FC100) come from Google-Drive mirrors; a
pickle can call any importable function when loaded, so :func:`load_pickle` allows only the globals that
rebuild numpy arrays, dtypes and scalars and a few inert builtins, and refuses any other by name. Python 2
pickles are read with ``encoding="latin1"`` (their ``str`` are bytes; latin1 maps them one to one).
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import IO, Any

from metashot.errors import DataError

ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "list"),
    ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "complex"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocols 0-2
}


class RefusedPickle(DataError):
    """A pickle that would call something other than what rebuilds arrays and builtins."""


class _Restricted(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if ({"__builtin__": "builtins"}.get(module, module), name) in ALLOWED:  # Python 2's name
            return super().find_class(module, name)
        raise RefusedPickle(
            f"{self.path}: refused to load: the pickle calls {module}.{name}, and metashot unpickles only "
            "numpy arrays and plain builtins (a pickle can run any code)"
        )


def load_pickle(path: Path, file: IO[bytes] | None = None) -> Any:
    """The object pickled in ``path`` (or in the seekable ``file``, which ``path`` then names, e.g. a member
    of an archive), by the restricted unpickler. A :class:`~metashot.errors.DataError` names a missing file,
    an HTML page (a failed Google Drive download), or a truncated or corrupt pickle; :class:`RefusedPickle` a
    pickle that would call anything else."""
    try:
        with open(path, "rb") if file is None else contextlib.nullcontext(file) as f:
            if f.read(64).lstrip().startswith(b"<"):  # no pickle starts so; an HTML page does
                raise DataError(
                    f"{path}: an HTML page, not a pickle (a failed Google Drive download?); download the "
                    "file again"
                )
            f.seek(0)
            return _Restricted(f, path).load()
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        reason = " ".join(str(e).split())  # one line: some of pickle's messages hold a line break
        raise DataError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {reason})") from e
