"""Downloads verified by checksum and renamed into place, and where data and decode-once caches live."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from metashot.errors import DataError
from metashot.io import atomic_write


def default_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir``, else ``$METASHOT_DATA``, else a per-user cache folder."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("METASHOT_DATA"):
        return Path(os.environ["METASHOT_DATA"]).expanduser()
    return user_cache_dir()


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metashot"


def cache_path(root: Path, name: str) -> Path:
    """Where the cache ``name`` of the zips in ``root`` is: beside them, else in the user's cache; a new
    one goes beside them when their folder is writable, else to the user's cache."""
    for folder in (root, user_cache_dir()):
        if (folder / name).exists():
            return folder / name
    return (root if os.access(root, os.W_OK) else user_cache_dir()) / name


def digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(
    url: str, target: Path, expected: str | None = None, error: type[DataError] = DataError,
    progress: bool = True, hint: str = "",
) -> None:
    """Download ``url`` to ``target``, checked against ``expected`` (md5: 32 hex digits, sha256: 64) and
    renamed into place only when it matches. A failure is an ``error`` ending with ``hint``; nothing is
    left at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(out: IO[bytes]) -> None:
        h = hashlib.new("md5" if expected and len(expected) == 32 else "sha256")
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
        if expected and h.hexdigest() != expected.lower():
            raise error(f"{url}: {h.name} checksum is {h.hexdigest()}, expected {expected}; not saved")

    try:
        atomic_write(target, write)
    except (urllib.error.URLError, OSError) as e:
        raise error(f"could not download {url} ({e}). Offline? {hint}".rstrip()) from e
