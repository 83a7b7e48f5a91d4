"""The sources' images outside their episodes (``decode_files``, ``present``, ``examples``): an image file
decoded as the task's own cache stored it, and the stored images presented exactly as a test episode
carries them."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from metashot.config import Config
from metashot.data.sources import FewShotSource
from metashot.data.tasks import build_source
from metashot.errors import ConfigError, DataError
from tests.layouts.mini import write_folders

SMALL_OMNIGLOT = {"split": "official", "val_characters": 6}


@pytest.fixture(autouse=True)
def _user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing reaches the user's own cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def mini_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """miniImageNet's folders layout: JPEG files, decoded into the decode-once cache."""
    root = tmp_path_factory.mktemp("mini-folders")
    write_folders(root)
    return root


def _omniglot(root: Path, image_size: int = 28, **cfg: object) -> FewShotSource:
    args = {**SMALL_OMNIGLOT, "image_size": image_size}
    return build_source(Config(task="omniglot", data_dir=str(root), task_args=args, **cfg).validate())


def _mini(root: Path, **cfg: object) -> FewShotSource:
    return build_source(Config(task="miniimagenet", data_dir=str(root), ways=5, shots=1, queries=1,
                               train_queries=1, **cfg).validate())


def _test_episodes_match_examples(source: FewShotSource, episodes: int) -> None:
    """Each test episode's support and query images are ``examples`` of the flat indices its sampler drew."""
    sampler = source.sampler("test", episodes, seed=3, start=0, rank=0, world_size=1)
    drawn = list(sampler)
    batches = [b.to("cpu") for b in source.loader("test", episodes, seed=3)]
    got = [e for batch in batches for e in zip(batch.support, batch.query, strict=True)]
    assert len(got) == len(drawn) == episodes
    for item, (support, query) in zip(drawn, got, strict=True):
        k = item.shots
        assert torch.equal(source.examples("test", item.indices[:, :k].reshape(-1)), support)
        assert torch.equal(source.examples("test", item.indices[:, k:].reshape(-1)), query)


def test_omniglot_examples_are_its_test_episodes(omniglot_small_dir: Path) -> None:
    source = _omniglot(omniglot_small_dir, meta_batch=2, shots=2, queries=3)
    _test_episodes_match_examples(source, 4)
    flat = source.dataset("test").flat[:3]
    assert torch.equal(source.present(flat), flat.float() / 255)


def test_omniglot_decodes_a_file_as_its_zips(omniglot_small_dir: Path, tmp_path: Path) -> None:
    """A drawing taken out of the zip decodes to the image the cache holds (greyscale, Lanczos, inverted)."""
    member = "images_evaluation/Angelic/character03/0967_07.png"  # the drawer 07 of its 20
    with zipfile.ZipFile(omniglot_small_dir / "images_evaluation.zip") as z:
        (tmp_path / "drawing.png").write_bytes(z.read(member))
    for size in (28, 20):
        source = _omniglot(omniglot_small_dir, size)
        data = source.dataset("test")
        row = data.class_names.index("Angelic/character03/rot0") * 20 + 6
        decoded = source.decode_files([tmp_path / "drawing.png"])
        assert decoded.dtype == torch.uint8 and decoded.shape == (1, 1, size, size)
        assert torch.equal(decoded[0], data.flat[row])


def test_natural_images_are_presented_as_test_episodes(mini_folders: Path) -> None:
    """miniImageNet's test episodes: scaled and normalised by its mean and std, never augmented."""
    source = _mini(mini_folders, meta_batch=3, task_args={"augment": "crop-jitter-flip"})
    _test_episodes_match_examples(source, 5)
    flat = source.dataset("test").flat[:2]
    mean, std = torch.tensor(source.mean)[:, None, None], torch.tensor(source.std)[:, None, None]
    torch.testing.assert_close(source.present(flat), (flat.float() / 255 - mean) / std, rtol=0, atol=1e-6)
    plain = _mini(mini_folders, task_args={"normalize": False})
    assert torch.equal(plain.present(flat), flat.float() / 255)


def test_natural_image_files_decode_as_the_layout_did(mini_folders: Path) -> None:
    source = _mini(mini_folders)
    data = source.dataset("test")
    files = sorted((mini_folders / "test" / data.class_names[1]).iterdir())
    decoded = source.decode_files(files)
    assert decoded.dtype == torch.uint8 and decoded.shape == (len(files), 3, 84, 84)
    first = int(data.class_sizes[0])
    assert torch.equal(decoded, data.flat[first:first + len(files)])
    small = _mini(mini_folders, task_args={"image_size": 32})
    assert torch.equal(small.decode_files(files[:1])[0], small.dataset("test").flat[first])


@pytest.mark.filterwarnings("ignore:converted .* greyscale images to RGB")
def test_folder_files_decode_at_its_size_and_channels(patterns: Path) -> None:
    cfg = Config(task="folder", data_dir=str(patterns), ways=2, shots=2, queries=2,
                 task_args={"image_size": 16, "channels": 3})
    source = build_source(cfg.validate())
    data = source.dataset("test")
    files = sorted((patterns / data.class_names[0]).iterdir())
    assert torch.equal(source.decode_files(files), data.flat[:len(files)])
    _test_episodes_match_examples(source, 2)


def test_a_file_that_does_not_decode_is_named(omniglot_small_dir: Path, mini_folders: Path,
                                              tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    for source in (_omniglot(omniglot_small_dir), _mini(mini_folders)):
        with pytest.raises(DataError, match=f"^{bad}: image does not decode"):
            source.decode_files([bad])
    assert source.decode_files([]).shape == (0, 3, 84, 84)


@pytest.mark.parametrize("task", ["sinusoid", "omniglot-sequences"])
def test_a_task_without_images_says_so(task: str, omniglot_small_dir: Path) -> None:
    source = build_source(Config(task=task, data_dir=str(omniglot_small_dir)).validate())
    for call in (lambda: source.decode_files([]), lambda: source.present(torch.zeros(1, 1, 2, 2)),
                 lambda: source.examples("test", torch.zeros(1, dtype=torch.long))):
        with pytest.raises(ConfigError, match=f"^--task {task} has no images"):
            call()
