"""CUB-200-2011: each split's classes per part, the pixels with and without the box crop, bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import metashot.data.tasks
from metashot.cli import main
from metashot.config import Config
from metashot.data.cub import CubSource, split_classes
from metashot.data.splits import CUB_CLASSES, CUB_FEAT, CUB_META_DATASET
from metashot.errors import DataError
from tests.layouts.cub import GREY_CLASS, Written, per_class, write_cub

PARTS = ("train", "val", "test")


@pytest.fixture(scope="module")
def cub(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Written]]:
    root = tmp_path_factory.mktemp("cub")
    return root, write_cub(root)


def _source(root: Path, **task_args: object) -> CubSource:
    return CubSource(Config(task="cub", data_dir=str(root), task_args=task_args))


def _reference(root: Path, w: Written, size: int, crop: bool) -> np.ndarray:
    """What the image should become, by Pillow alone: RGB, cropped to (x, y, x + w, y + h), resized."""
    with Image.open(root / "CUB_200_2011" / "images" / w.path) as im:
        im = im.convert("RGB")
        if crop:
            x, y, width, height = w.box
            im = im.crop((x, y, x + width, y + height))
        return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS))


def _class_of(w: Written) -> int:
    return CUB_CLASSES.index(w.path.split("/")[0])


def test_shipped_lists() -> None:
    assert len(CUB_CLASSES) == 200 and [int(n[:3]) for n in CUB_CLASSES] == list(range(1, 201))
    assert sorted(CUB_CLASSES) == list(CUB_CLASSES)
    for split in (CUB_FEAT, CUB_META_DATASET):
        assert sorted(n for part in split.values() for n in part) == list(range(1, 201))
    # the BRIEF's check: only 12 of FEAT's 50 test classes are CloserLook's
    assert len({n - 1 for n in CUB_FEAT["test"]} & set(split_classes("closerlook")["test"])) == 12


# per split: the counts, then a class of each part by the published lists (torchmeta's test.json begins
# with 004; FEAT's train/val/test.csv begin with 019, 159, 133; cu_birds_splits.json with 190, 044, 008)
SPLITS = {
    "closerlook": ((100, 50, 50),
                   ("001.Black_footed_Albatross", "002.Laysan_Albatross", "004.Groove_billed_Ani")),
    "feat": ((100, 50, 50),
             ("019.Gray_Catbird", "159.Black_and_white_Warbler", "133.White_throated_Sparrow")),
    "meta-dataset": ((140, 30, 30),
                     ("190.Red_cockaded_Woodpecker", "044.Frigatebird", "008.Rhinoceros_Auklet")),
}


@pytest.mark.parametrize("split", SPLITS)
def test_split_classes_per_part(cub: tuple[Path, list[Written]], split: str) -> None:
    root, written = cub
    counts, members = SPLITS[split]
    source = _source(root, split=split, image_size=8)
    assert source.layout.name == "official"
    with pytest.warns(UserWarning, match="converted 1 greyscale images to RGB"):
        parts = {part: source.dataset(part) for part in PARTS}
    assert tuple(parts[p].num_classes for p in PARTS) == counts
    assert sum(len(d) for d in parts.values()) == len(written)
    for part, member in zip(PARTS, members):
        names = parts[part].class_names
        assert member in names and names == sorted(names)
        assert parts[part].class_sizes.tolist() == [per_class(CUB_CLASSES.index(n)) for n in names]
    assert sorted(sum((d.class_names for d in parts.values()), [])) == list(CUB_CLASSES)


def test_closerlook_rule(cub: tuple[Path, list[Written]]) -> None:
    parts = split_classes("closerlook")
    assert parts["val"][:3] == (1, 5, 9) and parts["test"][:3] == (3, 7, 11)
    assert parts["train"] == tuple(range(0, 200, 2))


@pytest.mark.parametrize("crop", [False, True])
def test_pixels(cub: tuple[Path, list[Written]], crop: bool) -> None:
    root, written = cub
    source = _source(root / "CUB_200_2011", crop=crop, image_size=16)  # data_dir may be CUB_200_2011 itself
    with pytest.warns(UserWarning, match="converted 1 greyscale"):
        data = source.dataset("val")  # closerlook's val holds the greyscale image's class
    val = set(split_classes("closerlook")["val"])
    mine = [w for w in written if _class_of(w) in val]
    x = data.flat.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(x, np.stack([_reference(root, w, 16, crop) for w in mine]))
    if crop:  # each crop is its box's flat colour, give or take JPEG's rounding
        inside = np.array([w.inside for w in mine], np.int16)[:, None, None]
        assert np.abs(x.astype(np.int16) - inside).max() <= 3
    grey = next(i for i, w in enumerate(mine) if _class_of(w) == GREY_CLASS)
    assert (x[grey] == x[grey][..., :1]).all()


def test_defaults_and_distinct_caches(cub: tuple[Path, list[Written]]) -> None:
    root, _ = cub
    source = _source(root)
    assert source.image_size == 84 and source.classes == {"train": 100, "val": 50, "test": 50}
    caches = {_source(root, split=s, crop=c)._cache("train")[0].name
              for s in ("closerlook", "feat") for c in (False, True)}
    assert len(caches) == 4


def _copy(cub: tuple[Path, list[Written]], to: Path) -> Path:
    """A copy of the text files, its images linked to the fixture's."""
    base = to / "CUB_200_2011"
    base.mkdir(parents=True)
    for f in (cub[0] / "CUB_200_2011").iterdir():
        if f.is_dir():
            (base / f.name).symlink_to(f)
        else:
            shutil.copy(f, base / f.name)
    return base


def test_missing_images_txt(cub: tuple[Path, list[Written]], tmp_path: Path) -> None:
    base = _copy(cub, tmp_path)
    (base / "images.txt").unlink()
    with pytest.raises(DataError, match=f"^{tmp_path}: the official layout \\(CUB_200_2011/images/"
                       r"<NNN.Name>/\*.jpg with images.txt \(and bounding_boxes.txt for crop\)\) lacks "
                       r"CUB_200_2011/images.txt$"):
        _source(tmp_path)
    with pytest.raises(DataError, match=f"^{base}/images.txt: not found \\(official layout: "):
        _source(tmp_path, layout="official")


def test_missing_boxes_with_crop(cub: tuple[Path, list[Written]], tmp_path: Path) -> None:
    base = _copy(cub, tmp_path)
    (base / "bounding_boxes.txt").unlink()
    assert _source(tmp_path).layout.name == "official"  # needed only to crop
    with pytest.raises(DataError, match=f"^{base}/bounding_boxes.txt: not found"):
        _source(tmp_path, layout="official", crop=True)


def test_box_missing_for_an_image(cub: tuple[Path, list[Written]], tmp_path: Path) -> None:
    base = _copy(cub, tmp_path)
    lines = (base / "bounding_boxes.txt").read_text().splitlines()
    (base / "bounding_boxes.txt").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match=r"bounding_boxes.txt: no box for image 1 \(1 images without one\)"):
        _source(tmp_path, crop=True).dataset("train")


@pytest.mark.parametrize("edit,message", [
    (lambda lines: lines[:2] + ["garbage"] + lines[2:],
     r"images.txt: line 3 is 'garbage', expected '<image id> <class folder>/<file>.jpg'"),
    (lambda lines: lines + ["9999 201.Dodo/Dodo_0001_1.jpg"],
     r"images.txt: names class folder '201.Dodo', not one of CUB-200-2011's 200 \(1 such\)"),
    (lambda lines: [line for line in lines if "/007.Parakeet_Auklet/" not in f"/{line.split()[1]}"],
     r"images.txt: names no image of class '007.Parakeet_Auklet' \(1 of CUB-200-2011's 200 classes"),
    (lambda lines: lines + ["9999 001.Black_footed_Albatross/gone.jpg"],
     r"001.Black_footed_Albatross/gone.jpg: not found \(1 of the images images.txt names for train are"),
])
def test_bad_images_txt(cub: tuple[Path, list[Written]], tmp_path: Path, edit: object, message: str) -> None:
    base = _copy(cub, tmp_path)
    lines = (base / "images.txt").read_text().splitlines()
    (base / "images.txt").write_text("\n".join(edit(lines)) + "\n")
    with pytest.raises(DataError, match=message):
        _source(tmp_path).dataset("train")


def test_empty_folder_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"^{tmp_path}/CUB_200_2011/images.txt: not found"):
        _source(tmp_path, layout="official")


def test_bad_task_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"split must be one of \('closerlook', 'feat', 'meta-dataset'\), "
                       "got 'random'"):
        _source(tmp_path, split="random")
    with pytest.raises(ValueError, match="crop must be true or false, got 'yes'"):
        _source(tmp_path, crop="yes")


def test_cli_names_a_missing_image(
    cub: tuple[Path, list[Written]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = _copy(cub, tmp_path / "data")
    with open(base / "images.txt", "a") as f:
        f.write("9999 001.Black_footed_Albatross/gone.jpg\n")
    gone = base / "images" / "001.Black_footed_Albatross" / "gone.jpg"
    monkeypatch.setitem(metashot.data.tasks.TASKS, "cub", CubSource)
    code = main(["train", "protonet", "--task", "cub", "--data-dir", str(tmp_path / "data"), "--steps", "1",
                 "--run-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"metashot: error: {gone}: not found (1 of the images images.txt names for train are missing)")
