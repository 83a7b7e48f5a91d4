"""Writers of tiny copies of every dataset layout metashot reads, in the exact file formats."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from metashot import cli

Written = dict[str, dict[str, np.ndarray]]  # per part, each class's name and images [n, H, W, C]


def write_each(factory: pytest.TempPathFactory, writers: dict[str, Any]) -> dict[str, tuple[Path, Written]]:
    """A folder of each layout ``writers`` writes (by name), with what it holds."""
    return {name: (root, write(root)) for name, write in writers.items() for root in [factory.mktemp(name)]}


def reads(source: Any, written: Written) -> None:
    """``source`` holds ``written``: the class names in order, their sizes and every pixel."""
    for part, classes in written.items():
        data = source.dataset(part)
        assert data.class_names == list(classes)
        assert data.class_sizes.tolist() == [len(x) for x in classes.values()]
        pixels = data.flat.permute(0, 2, 3, 1).numpy()
        assert np.array_equal(pixels, np.concatenate(list(classes.values())))


def copy_without_cache(root: Path, target: Path, task: str) -> Path:
    """The dataset's files in ``root`` copied to ``target``, without the ``task``'s cache."""
    shutil.copytree(root, target, ignore=shutil.ignore_patterns(f"{task}-*"))
    return target


def cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one-line error of ``metashot argv``, which exits 2, without its prefix."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, (code, out, err)
    assert err.startswith("metashot: error: ")
    return err.strip().removeprefix("metashot: error: ")
