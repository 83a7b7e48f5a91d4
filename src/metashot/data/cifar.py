"""CIFAR-FS (Bertinetto et al. ICLR 2019) and FC100 (Oreshkin et al. NeurIPS 2018): CIFAR-100's classes,
600 images of 32 x 32 each, split 64 / 16 / 20 classes (CIFAR-FS) or by superclass 60 / 20 / 20 (FC100).

Read from the copy a user holds, in any of these layouts (BRIEF section 8):

- ``cifar-100-python``: the official ``cifar-100-python.tar.gz`` (read in place, not extracted) or its
  extracted folder, Python 2 pickles ``train``, ``test`` (``data`` uint8 [N, 3072], RGB planes of 32 x 32,
  and ``fine_labels``) and ``meta`` (``fine_label_names``); both parts are pooled (500 + 100 images a
  class) and split by the shipped class lists (:mod:`metashot.data.splits`). Downloaded from
  :data:`URL`, its md5 checked, when no layout is found and task_arg ``download`` is true;
- ``r2d2`` (CIFAR-FS only): ``cifar100/data/<class>/*.png`` with ``cifar100/splits/bertinetto/
  {train,val,test}.txt`` (bertinetto/r2d2, learn2learn);
- ``pickle``: ``CIFAR_FS_{train,val,test}.pickle`` or ``FC100_{train,val,test}.pickle``, ``data`` uint8
  (N, 32, 32, 3) and ``labels``, CIFAR-100 fine label numbers (MetaOptNet, RFS).

Every layout names the classes by their CIFAR-100 fine names, in CIFAR-100's label order.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from metashot.data.download import fetch
from metashot.data.images import read_images
from metashot.data.imageset import ImageSetSource, Layout, Part, check_array, check_keys
from metashot.data.pickles import load_pickle
from metashot.data.splits import CIFAR100_FINE, CIFAR100_SUPERCLASS, CIFAR_FS, FC100_SUPERCLASSES
from metashot.errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
# CIFAR-FS/FC100 pixel statistics (MetaOptNet), in [0, 1] units
MEAN = (129.37731888 / 255, 124.10583864 / 255, 112.47758569 / 255)
STD = (68.20947949 / 255, 65.43124043 / 255, 70.45866994 / 255)

Split = dict[str, tuple[int, ...]]  # each part's CIFAR-100 fine label numbers
CIFAR_FS_SPLIT: Split = {part: tuple(sorted(CIFAR100_FINE.index(n) for n in names))
                         for part, names in CIFAR_FS.items()}
FC100_SPLIT: Split = {part: tuple(f for f, s in enumerate(CIFAR100_SUPERCLASS) if s in superclasses)
                      for part, superclasses in FC100_SUPERCLASSES.items()}


def fine_part(images: np.ndarray, fine: np.ndarray, classes: tuple[int, ...]) -> Part:
    """The images of fine labels ``classes`` among ``images`` [N, 32, 32, 3] labelled ``fine`` [N]."""
    rows = np.flatnonzero(np.isin(fine, classes))
    labels = np.searchsorted(np.array(classes), fine[rows])
    return Part(labels, [CIFAR100_FINE[c] for c in classes], lambda r: images[rows[r]])


def fine_labels(labels: Any, n: int, where: str, key: str) -> np.ndarray:
    """``labels`` as int [n] of CIFAR-100 fine label numbers, else a DataError naming ``where``, ``key``."""
    fine = np.asarray(labels)
    integers = fine.shape == (n,) and np.issubdtype(fine.dtype, np.integer)
    if not integers or (n and not 0 <= fine.min() <= fine.max() < 100):
        raise DataError(f"{where}: {key!r} must be {n} CIFAR-100 fine labels (integers 0..99)")
    return fine.astype(np.int64)


class OfficialLayout(Layout):
    """The official python version of CIFAR-100, as its tarball or extracted."""

    name = "cifar-100-python"
    files = f"{ARCHIVE} or its extracted {FOLDER}/ (train, test, meta)"
    members = ("train", "test", "meta")

    def __init__(self, split: Split) -> None:
        self.split = split

    def sources(self, root: Path, part: str) -> list[Path]:
        if (root / ARCHIVE).exists() or not (root / FOLDER).is_dir():
            return [root / ARCHIVE]
        return [root / FOLDER / m for m in self.members]

    def read(self, root: Path, part: str, image_size: int) -> Part:
        pickles = self._pickles(root)
        names = check_keys(pickles["meta"][1], pickles["meta"][0], ("fine_label_names",))["fine_label_names"]
        if list(names) != list(CIFAR100_FINE):
            raise DataError(f"{pickles['meta'][0]}: 'fine_label_names' are not CIFAR-100's 100 classes")
        images, fine = [], []
        for member in ("train", "test"):
            where, obj = pickles[member]
            obj = check_keys(obj, where, ("data", "fine_labels"))
            data = obj["data"]
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
                raise DataError(f"{where}: 'data' is not uint8 [N, 3072] (32 x 32 RGB planes)")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            fine.append(fine_labels(obj["fine_labels"], len(data), str(where), "fine_labels"))
        return fine_part(np.concatenate(images), np.concatenate(fine), self.split[part])

    def _pickles(self, root: Path) -> dict[str, tuple[Path, Any]]:
        """Each member's name (for errors) and unpickled object, from the tarball or the folder."""
        (first, *_) = self.sources(root, "train")
        if first.name != ARCHIVE:
            return {m: (root / FOLDER / m, load_pickle(root / FOLDER / m)) for m in self.members}
        out = {}
        try:
            with tarfile.open(first, "r:gz") as tar:
                for m in self.members:
                    try:
                        f = tar.extractfile(f"{FOLDER}/{m}")
                    except KeyError:
                        f = None
                    if f is None:
                        raise DataError(f"{first}: no file {FOLDER}/{m}; expected the official {ARCHIVE}")
                    out[m] = (first / FOLDER / m, load_pickle(first / FOLDER / m, io.BytesIO(f.read())))
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            problem = f"{type(e).__name__}: {e}"
            raise DataError(f"{first}: not a readable tar.gz ({problem}); download it again") from e
        return out


class R2D2Layout(Layout):
    """bertinetto/r2d2's CIFAR-FS: class folders of PNGs and the split's class lists."""

    name = "r2d2"
    files = "cifar100/data/<class>/*.png with cifar100/splits/bertinetto/{train,val,test}.txt"

    @staticmethod
    def base(root: Path) -> Path:
        """The ``cifar100`` folder: ``root`` itself when it holds the split lists, else in ``root``."""
        return root if (root / "splits" / "bertinetto").is_dir() else root / "cifar100"

    def sources(self, root: Path, part: str) -> list[Path]:
        base = self.base(root)
        return [base / "splits" / "bertinetto" / f"{part}.txt", base / "data"]

    def read(self, root: Path, part: str, image_size: int) -> Part:
        path, data = self.sources(root, part)
        listed = {line.strip() for line in path.read_text().splitlines() if line.strip()}
        if listed != set(CIFAR_FS[part]):
            odd = sorted(listed - set(CIFAR_FS[part])) or sorted(set(CIFAR_FS[part]) - listed)
            raise DataError(f"{path}: lists {len(listed)} classes, not CIFAR-FS's {part} split of "
                            f"{len(CIFAR_FS[part])} (e.g. {odd[0]!r} differs)")
        names = [CIFAR100_FINE[c] for c in CIFAR_FS_SPLIT[part]]
        files = []
        for name in names:
            found = sorted((data / name).glob("*.png"))
            if not found:
                raise DataError(f"{data / name}: no .png images of class {name!r} ({self.files})")
            files.append(found)
        labels = np.repeat(np.arange(len(names)), [len(f) for f in files])
        flat = [f for fs in files for f in fs]
        return Part(labels, names, lambda rows: read_images([flat[i] for i in rows], image_size, 3))


class PickleLayout(Layout):
    """MetaOptNet's and RFS's pickles of one part each."""

    name = "pickle"

    def __init__(self, prefix: str, split: Split) -> None:
        self.prefix, self.split = prefix, split
        self.files = f"{prefix}_{{train,val,test}}.pickle"

    def sources(self, root: Path, part: str) -> list[Path]:
        return [root / f"{self.prefix}_{part}.pickle"]

    def read(self, root: Path, part: str, image_size: int) -> Part:
        (path,) = self.sources(root, part)
        obj = check_keys(load_pickle(path), path, ("data", "labels"))
        images = check_array(obj["data"], path, "data", size=32)
        fine = fine_labels(obj["labels"], len(images), str(path), "labels")
        outside = sorted(set(np.unique(fine).tolist()) - set(self.split[part]))
        if outside:
            raise DataError(f"{path}: 'labels' hold {len(outside)} classes outside the {part} split, e.g. "
                            f"fine label {outside[0]} ({CIFAR100_FINE[outside[0]]!r})")
        return fine_part(images, fine, self.split[part])


class _CifarSource(ImageSetSource):
    """A split of CIFAR-100; task_arg ``download`` (true): fetch the official tarball into ``data_dir`` when
    the layout asked for (``auto``: any) is not there, unless another than ``cifar-100-python`` is asked."""

    default_image_size = 32
    padding = 4
    mean, std = MEAN, STD

    def _parse(self, args: dict[str, Any]) -> None:
        self.download = bool(args.pop("download", True))

    def _detect(self, name: str) -> Layout:
        wanted = [x for x in self.layouts if name in ("auto", x.name)]
        fetchable = self.download and name in ("auto", OfficialLayout.name)
        if fetchable and not any(x.found(self.root) for x in wanted):
            fetch(URL, self.root / ARCHIVE, MD5,
                  hint=f"Put {ARCHIVE} (www.cs.toronto.edu/~kriz/cifar.html) or one of the other layouts in "
                  f"{self.root} ({self.needs()}).")
        return super()._detect(name)


class CifarFSSource(_CifarSource):
    """CIFAR-FS (Bertinetto et al. ICLR 2019): 64 / 16 / 20 CIFAR-100 classes, 32 x 32 RGB."""

    name = "cifar-fs"
    layouts = (OfficialLayout(CIFAR_FS_SPLIT), R2D2Layout(), PickleLayout("CIFAR_FS", CIFAR_FS_SPLIT))
    classes = {"train": 64, "val": 16, "test": 20}


class FC100Source(_CifarSource):
    """FC100 (Oreshkin et al. NeurIPS 2018): CIFAR-100 split by superclass, 12 / 4 / 4 superclasses of 60 /
    20 / 20 classes, 32 x 32 RGB."""

    name = "fc100"
    layouts = (OfficialLayout(FC100_SPLIT), PickleLayout("FC100", FC100_SPLIT))
    classes = {"train": 60, "val": 20, "test": 20}
