"""Omniglot (Lake et al. 2015): download, verify, decode once, cache, and the papers' splits.

The two official zips are decoded once, resized with antialiasing and cached next to them as one
uint8 array of shape [1623 characters, 20 drawers, size, size], ink = 255 on a 0 background. The cache
name carries the zips' digest and the size, so changed zips or another size build a new cache.
:class:`OmniglotSource` ("omniglot") serves its parts as episodes, the train part as labelled examples,
and sequence episodes (Santoro et al. 2016); :class:`OmniglotSequenceSource` ("omniglot-sequences") is the
sequence-only source at 20 x 20.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from metashot.batches import SequenceTaskInfo, TaskInfo
from metashot.config import Config
from metashot.data.download import cache_path, default_root, digest, fetch, user_cache_dir
from metashot.data.fewshot import FewShotDataset
from metashot.data.sequences import SequenceTask
from metashot.data.sources import FewShotSource, TaskSource, class_key
from metashot.errors import DataError
from metashot.io import atomic_write

ZIPS = ("images_background", "images_evaluation")
URL_PREFIX = "https://github.com/brendenlake/omniglot/raw/master/python/"
# md5 of the official zips (the same digests torchvision and other loaders check).
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
NUM_CHARACTERS = 1623
DRAWERS = 20
SPLITS = ("random", "alphabet", "official")
_MEMBER = re.compile(r"^(images_background|images_evaluation)/([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")


class OmniglotError(DataError, RuntimeError):
    """A missing, corrupt or malformed Omniglot file."""


def download(
    root: Path,
    url_prefix: str = URL_PREFIX,
    checksums: dict[str, str] | None = None,
    progress: bool = True,
) -> None:
    """Download whichever official zips are missing from ``root``, verified, renamed into place.

    ``checksums`` maps a zip's stem to its md5 (32 hex digits) or sha256 (64); default: the official md5.
    """
    checksums = OFFICIAL_MD5 if checksums is None else checksums
    for name in ZIPS:
        target = root / f"{name}.zip"
        if not target.exists():
            fetch(url_prefix + f"{name}.zip", target, checksums.get(name), OmniglotError, progress,
                  hint="Put images_background.zip and images_evaluation.zip (github.com/brendenlake/"
                  f"omniglot, python/) in {root}, or point --data-dir / METASHOT_DATA at the folder that "
                  "holds them.")


@dataclass(frozen=True)
class Omniglot:
    """All 1623 characters: ``images`` [1623, 20, S, S] uint8 (ink 255), with each one's names."""

    images: torch.Tensor
    alphabets: tuple[str, ...]  # per character
    characters: tuple[str, ...]  # per character, e.g. "character07"
    background: torch.Tensor  # [1623] bool, True for the official background set

    @classmethod
    def load(
        cls,
        data_dir: str | os.PathLike | None = None,
        image_size: int = 28,
        download_missing: bool = True,
        url_prefix: str = URL_PREFIX,
        checksums: dict[str, str] | None = None,
    ) -> Omniglot:
        """Load from the cache, building it (and downloading the zips) when needed."""
        root = default_root(data_dir)
        zips = [root / f"{name}.zip" for name in ZIPS]
        if not all(z.exists() for z in zips):
            if not download_missing:
                missing = ", ".join(z.name for z in zips if not z.exists())
                raise OmniglotError(f"{missing} not found in {root}")
            download(root, url_prefix, checksums)
        cache = cache_path(root, cache_name(zips, image_size))
        if cache.exists():
            try:
                return cls._from_cache(cache)
            except Exception as e:  # numpy raises several types for a damaged file
                warnings.warn(f"{cache}: damaged Omniglot cache ({e}); rebuilding it", stacklevel=2)
                if not os.access(cache.parent, os.W_OK):
                    cache = user_cache_dir() / cache.name
        cache.parent.mkdir(parents=True, exist_ok=True)
        _build_cache(zips, image_size, cache)
        return cls._from_cache(cache)

    @classmethod
    def _from_cache(cls, cache: Path) -> Omniglot:
        with np.load(cache, allow_pickle=False) as f:
            return cls(
                images=torch.from_numpy(f["images"]),
                alphabets=tuple(f["alphabets"].tolist()),
                characters=tuple(f["characters"].tolist()),
                background=torch.from_numpy(f["background"]),
            )

    def classes(
        self,
        split: str = "random",
        part: str = "train",
        rotations: bool = True,
        seed: int = 0,
        val_characters: int = 172,
    ) -> FewShotDataset:
        """The characters of one ``part`` ("train", "val", "trainval" or "test") of a named split.

        Splits: "random" is the papers' 1,200 / 423 character split drawn with ``seed``; "alphabet"
        draws whole alphabets with ``seed`` until 1,200 characters are taken; "official" is the
        background (964) / evaluation (659) split. "val" is ``val_characters`` of the training
        characters (172 of 1,200 as in Prototypical Networks). With ``rotations``, each character
        rotated by 0/90/180/270 degrees is its own class (4x classes).
        """
        train_idx, test_idx = self._split(split, seed)
        g = torch.Generator().manual_seed(seed + 1)
        train_idx = train_idx[torch.randperm(len(train_idx), generator=g)]
        parts = {
            "train": train_idx[val_characters:],
            "val": train_idx[:val_characters],
            "trainval": train_idx,
            "test": test_idx,
        }
        if part not in parts:
            raise ValueError(f"part must be one of {sorted(parts)}, got {part!r}")
        idx = parts[part].sort().values
        images = self.images[idx]  # [C, 20, S, S]
        names = [f"{self.alphabets[i]}/{self.characters[i]}" for i in idx.tolist()]
        if rotations:
            images = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
            names = [f"{n}/rot{90 * k}" for k in range(4) for n in names]
        return FewShotDataset(images.unsqueeze(2), names)

    def _split(self, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.alphabets)
        if split == "official":
            all_idx = torch.arange(n)
            return all_idx[self.background], all_idx[~self.background]
        g = torch.Generator().manual_seed(seed)
        if split == "random":
            perm = torch.randperm(n, generator=g)
            return perm[:1200], perm[1200:]
        if split == "alphabet":
            names = sorted(set(self.alphabets))
            order = [names[i] for i in torch.randperm(len(names), generator=g).tolist()]
            alphabet = np.array(self.alphabets)
            train: list[int] = []
            for a in order:
                if len(train) >= 1200:
                    break
                train.extend(np.flatnonzero(alphabet == a).tolist())
            mask = torch.zeros(n, dtype=torch.bool)
            mask[train] = True
            all_idx = torch.arange(n)
            return all_idx[mask], all_idx[~mask]
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def cache_name(zips: list[Path], image_size: int) -> str:
    """The decode-once cache's file name: it carries the zips' digest and the size."""
    key = hashlib.sha256("".join(digest(z, "sha256") for z in zips).encode()).hexdigest()[:16]
    return f"omniglot-{image_size}px-{key}.npz"


def _decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L").resize((size, size), Image.Resampling.LANCZOS)
        return 255 - np.asarray(im, dtype=np.uint8)


def _decode_file(path: Path, size: int) -> np.ndarray:
    try:
        return _decode(path.read_bytes(), size)
    except Exception as e:  # PIL raises several types for a bad image
        raise OmniglotError(f"{path}: image does not decode ({e})") from None


def _read_zip(path: Path, size: int) -> dict[tuple[str, str], list[tuple[int, np.ndarray]]]:
    """Decode one zip into {(alphabet, character): [(drawer, image)]}."""
    found: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                m = _MEMBER.match(info.filename)
                if m is None or m.group(1) != path.stem:
                    raise OmniglotError(
                        f"{path.name}: unexpected member {info.filename!r}; expected "
                        f"{path.stem}/<Alphabet>/characterNN/NNNN_MM.png"
                    )
                found.setdefault((m.group(2), m.group(3)), []).append(
                    (int(m.group(5)), z.read(info))
                )
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as e:
        raise OmniglotError(f"{path}: corrupt or truncated zip ({e})") from e

    def decode(item: tuple[tuple[str, str], int, bytes]) -> np.ndarray:
        (alphabet, character), drawer, data = item
        try:
            return _decode(data, size)
        except Exception as e:  # PIL raises several types for a bad image
            raise OmniglotError(
                f"{path.name}: {alphabet}/{character} drawer {drawer:02d} does not decode ({e})"
            ) from e

    items = [(k, d, b) for k, v in found.items() for d, b in sorted(v)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(pool.map(decode, items, chunksize=256))
    out: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
    for (key, drawer, _), image in zip(items, decoded, strict=True):
        out.setdefault(key, []).append((drawer, image))
    return out


def _build_cache(zips: list[Path], size: int, cache: Path) -> None:
    images, alphabets, characters, background = [], [], [], []
    for path in zips:
        chars = _read_zip(path, size)
        for (alphabet, character), drawn in sorted(chars.items()):
            if len(drawn) != DRAWERS:
                raise OmniglotError(
                    f"{path.name}: {alphabet}/{character} has {len(drawn)} images, expected {DRAWERS}"
                )
            images.append(np.stack([im for _, im in drawn]))
            alphabets.append(alphabet)
            characters.append(character)
            background.append(path.stem == "images_background")
    if len(images) != NUM_CHARACTERS:
        raise OmniglotError(f"found {len(images)} characters in {zips}, expected {NUM_CHARACTERS}")
    atomic_write(
        cache,
        lambda f: np.savez(
            f,
            images=np.stack(images),
            alphabets=np.array(alphabets),
            characters=np.array(characters),
            background=np.array(background),
        ),
    )


class OmniglotSource(FewShotSource):
    """Omniglot; task_args: split ("random"), image_size (28), rotations (True), val_characters (172),
    and those of its sequence episodes (:class:`~metashot.data.sequences.SequenceTask`): classes,
    instances, labels, max_rotation, max_shift."""

    default_image_size = 28
    kinds = ("episodes", "examples", "sequences")

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        args = dict(cfg.task_args)
        self.image_size = args.pop("image_size", self.default_image_size)
        self.split = args.pop("split", "random")
        self.rotations = args.pop("rotations", True)
        self.val_characters = args.pop("val_characters", 172)
        self.sequences = SequenceTask.pop(args, cfg.ways)
        if args:
            raise ValueError(f"unknown {cfg.task} task_args {sorted(args)}")
        self._parts: dict[str, FewShotDataset] = {}

    @cached_property
    def omniglot(self) -> Omniglot:
        return Omniglot.load(self.cfg.data_dir, self.image_size)

    def dataset(self, part: str) -> FewShotDataset:
        if part not in self._parts:
            self._parts[part] = self.omniglot.classes(
                self.split, part, self.rotations, self.cfg.class_split_seed, self.val_characters
            )
        return self._parts[part]

    def task_info(self, kind: str | None = None) -> TaskInfo:
        if self.check_kind(kind) == "sequences":
            return self.sequences.info((1, self.image_size, self.image_size))
        return super().task_info(kind)

    def decode_files(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Image files decoded as the zips' are: greyscale, Lanczos-resized to ``image_size``, inverted
        (ink 255): uint8 [M, 1, S, S]. An :class:`OmniglotError` naming a file that does not decode."""
        size = self.image_size
        images = [_decode_file(Path(p), size) for p in paths]
        stacked = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
        return torch.from_numpy(stacked).unsqueeze(1)

    def data_key(self, part: str) -> dict[str, Any]:
        """:meth:`FewShotSource.data_key`: the decode-once cache's name (the zips' digest and the size) and
        the part's classes."""
        zips = [default_root(self.cfg.data_dir) / f"{name}.zip" for name in ZIPS]
        return {"images": cache_name(zips, self.image_size), "classes": class_key(self.dataset(part))}

    def loader(
        self, part: str, episodes: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
        kind: str | None = None,
    ) -> Iterable[Any]:
        """:meth:`FewShotSource.loader`, and for "sequences" :class:`~metashot.batches.SequenceBatch` es
        of ``meta_batch`` sequence episodes."""
        if self.check_kind(kind) == "sequences":
            return self.sequences.loader(self.dataset(part), part, episodes, self.cfg.meta_batch, seed=seed,
                                         start=start, rank=rank, world_size=world_size)
        return super().loader(part, episodes, seed, start, rank, world_size, kind)


class OmniglotSequenceSource(OmniglotSource):
    """Omniglot sequence episodes only, for MANN (Santoro et al. 2016), at 20 x 20 by default: "omniglot"
    with ``kind="sequences"`` (its task_args, image_size 20 here)."""

    default_image_size = 20
    kinds = ("sequences",)

    @staticmethod
    def shape(cfg: Config) -> str:
        return SequenceTask.shape(cfg)

    @property
    def info(self) -> SequenceTaskInfo:
        return self.sequences.info((1, self.image_size, self.image_size))

    # its test batches are sequences, not episodes of images: "omniglot" serves those
    decode_files = TaskSource.decode_files
    present = TaskSource.present
    examples = TaskSource.examples
