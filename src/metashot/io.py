"""Files: atomic writes (a temporary file in the same folder, renamed into place) and guarded image reads."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from PIL import Image

_UMASK = os.umask(0)
os.umask(_UMASK)


def _write_temporary(path: Path, write: Callable[[IO[bytes]], None]) -> str:
    """A temporary file beside ``path`` that ``write`` filled, fsynced; removed again if anything fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it a normal file's mode
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then rename it to ``path``."""
    atomic_write_all({Path(path): write})


def atomic_write_all(files: dict[Path, Callable[[IO[bytes]], None]]) -> None:
    """Write every file of ``files`` to a temporary beside it, then rename them all into place, in order.

    A write that fails (a full disk) fails before any rename, so it leaves every file as it was.
    """
    temporaries: list[tuple[str, Path]] = []
    try:
        for path, write in files.items():
            temporaries.append((_write_temporary(Path(path), write), Path(path)))
        for tmp, path in temporaries:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temporaries:
            if os.path.exists(tmp):
                os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


@contextmanager
def open_image(source: str | os.PathLike | IO[bytes], name: str | None = None) -> Iterator[Image.Image]:
    """``PIL.Image.open(source)``; an image over Pillow's decompression-bomb limit (its error, or its
    warning made an error) is a ValueError naming the file (``name``, else ``source``), not a traceback
    that names none."""
    try:
        with Image.open(source) as im:
            yield im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{name or source}: too large to decode ({str(e).rstrip('.')}); shrink the image or "
                         "remove it") from e
