"""The natural-image source's episode stream: augmented pixels fixed by (seed, episode) whatever the number
of processes, the resume point or the loader workers; test episodes never augmented; `metashot data`."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from metashot import cli
from metashot.batches import Episode
from metashot.config import Config
from metashot.data.tasks import build_source
from metashot.errors import DataError
from tests.layouts import copy_without_cache
from tests.layouts.mini import write_cache, write_csv


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mini")
    write_cache(root)
    return root


def _source(root: Path, **task_args: object) -> object:
    args = {"augment": "crop-jitter-flip", **task_args}
    cfg = Config(task="miniimagenet", data_dir=str(root), task_args=args, ways=5, shots=1, queries=1,
                 train_queries=1, meta_batch=4)
    return build_source(cfg.validate())


def _batches(source: object, part: str = "train", episodes: int = 8, **kw: int) -> list[Episode]:
    return [b.to("cpu") for b in source.loader(part, episodes, seed=3, **kw)]


def _pixels(batches: list[Episode]) -> list[torch.Tensor]:
    return [torch.cat([b.support, b.query], 1) for b in batches]


def test_two_processes_draw_the_one_process_pixels(mini: Path) -> None:
    source = _source(mini)
    one = _pixels(_batches(source))
    ranks = [_pixels(_batches(source, rank=r, world_size=2)) for r in range(2)]
    assert len(one) == 2 and one[0].shape[0] == 4 and ranks[0][0].shape[0] == 2
    for step, batch in enumerate(one):
        # rank r's step s holds episodes s*B + r + k*W of the one-process step s
        joined = torch.stack([ranks[j % 2][step][j // 2] for j in range(4)])
        assert torch.equal(joined, batch)
    assert not torch.equal(one[0][0], one[0][1])


def test_a_resumed_stream_and_loader_workers_draw_the_same_pixels(mini: Path) -> None:
    source = _source(mini)
    one = _pixels(_batches(source))
    assert torch.equal(_pixels(_batches(source, start=4))[0], one[1])
    workers = _pixels(_batches(_source(mini, workers=2)))
    assert all(torch.equal(a, b) for a, b in zip(one, workers, strict=True))


def test_training_episodes_are_augmented_and_test_episodes_never(mini: Path) -> None:
    augmented, plain = _source(mini), _source(mini, augment="none")
    assert not torch.equal(_pixels(_batches(augmented))[0], _pixels(_batches(plain))[0])
    for part in ("val", "test"):
        a, b = _pixels(_batches(augmented, part)), _pixels(_batches(plain, part))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # normalised with miniImageNet's statistics: per channel, about zero mean over noise images
    x = _pixels(_batches(plain, "test"))[0]
    assert x.dtype == torch.float32 and x.mean().abs() < 0.2


def test_data_command_reports_the_layout_and_parts(mini: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["data", str(mini), "--task", "miniimagenet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "cache" and report["image_shape"] == [3, 84, 84]
    assert {p: v["classes"] for p, v in report["parts"].items()} == {"train": 64, "val": 16, "test": 20}


def test_data_command_names_what_a_folder_lacks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["data", str(tmp_path), "--task", "miniimagenet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"metashot: error: {tmp_path}: no miniimagenet layout found; it needs one of: ")
    assert "category-split: miniImageNet_category_split_" in err and err.count("\n") == 1


def test_an_image_changed_in_place_builds_a_new_cache(tmp_path: Path) -> None:
    written = write_csv(tmp_path)
    before = _source(tmp_path, augment="none").dataset("test").flat[0].clone()
    first = next(iter(written["test"]))  # the test part's first class, its first image
    image = sorted((tmp_path / "images").glob(f"{first}*.jpg"))[0]
    Image.new("RGB", (84, 84), (255, 255, 255)).save(image)
    after = _source(tmp_path, augment="none").dataset("test").flat[0]
    assert not torch.equal(before, after) and int(after.min()) >= 250
    assert len(list(tmp_path.glob("miniimagenet-test-*.npy"))) == 2


def test_a_killed_builds_temporaries_are_removed_by_the_next(mini: Path, tmp_path: Path) -> None:
    root = copy_without_cache(mini, tmp_path / "mini", "miniimagenet")
    source = _source(root)
    stem = source._cache("train")[0].stem
    left = root / f".{stem}.npy.x1y2.tmp"
    left.write_bytes(b"half of a cache")
    source.dataset("train")
    assert not left.exists() and not list(root.glob(".*"))


def test_feats_split_folder_and_a_spreadsheets_bom_are_read(tmp_path: Path) -> None:
    written = write_csv(tmp_path)
    (tmp_path / "split").mkdir()
    for part in ("train", "val", "test"):
        text = (tmp_path / f"{part}.csv").read_text()
        (tmp_path / f"{part}.csv").unlink()
        (tmp_path / "split" / f"{part}.csv").write_text("\ufeff" + text, encoding="utf-8")
    source = _source(tmp_path, augment="none")
    assert source.layout.name == "csv"
    assert [source.dataset(p).class_names for p in written] == [list(c) for c in written.values()]


def test_images_in_two_parts_may_be_let_through_with_a_warning(mini: Path, tmp_path: Path) -> None:
    root = copy_without_cache(mini, tmp_path / "mini", "miniimagenet")
    with open(root / "mini-imagenet-cache-test.pkl", "rb") as f:
        test = pickle.load(f)  # the test's own file
    with open(root / "mini-imagenet-cache-train.pkl", "rb") as f:
        test["image_data"][0] = pickle.load(f)["image_data"][0]
    with open(root / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump(test, f)
    with pytest.raises(DataError, match="1 images of train are also in test"):
        _source(root).dataset("test")
    with pytest.warns(UserWarning, match="1 images of train are also in test"):
        assert _source(root, duplicates="warn").dataset("test").num_classes == 20
