"""The sources' images outside their episodes (``decode_files``, ``present``, ``examples``): an image file
decoded as the task's own cache stored it, and the stored images presented exactly as a test episode
carries them."""

from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from metashot.config import Config
from metashot.data.features import FeatureCache, differences, embed, evaluate_features
from metashot.data.sources import FewShotSource
from metashot.data.tasks import build_source
from metashot.errors import ConfigError, DataError
from metashot.evaluate import Result, evaluate
from metashot.methods import build_head
from metashot.methods.heads import HeadMethod
from metashot.nn.backbones import conv4
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


def _omniglot(root: Path, image_size: int = 28, rotations: bool = True, **cfg: object) -> FewShotSource:
    args = {**SMALL_OMNIGLOT, "image_size": image_size, "rotations": rotations}
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


# the embedding cache (metashot.data.features)

def _conv4(input_shape: tuple[int, ...], seed: int = 0, **args: float) -> nn.Module:
    """A small Conv4 with fixed random weights: a frozen encoder."""
    torch.manual_seed(seed)
    return conv4(input_shape, hidden=8, **args)


def _same_result(on_features: Result, on_images: Result) -> None:
    """The same accuracy per episode (its mean and spread equal), the same loss to float rounding (the
    encoder sees the images in batches of another size)."""
    assert on_features.episodes == on_images.episodes and on_features.metric == on_images.metric
    assert on_features.stats["acc"] == on_images.stats["acc"]
    torch.testing.assert_close(torch.tensor(on_features.stats["loss"]), torch.tensor(on_images.stats["loss"]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["prototype", "logistic"])
def test_a_head_scores_cached_features_as_it_scores_images(omniglot_small_dir: Path, head: str) -> None:
    source = _omniglot(omniglot_small_dir, shots=2, queries=3, meta_batch=4, rotations=False)
    encoder = _conv4((1, 28, 28))
    cache = embed(encoder, source, "test", batch_size=128)
    assert cache.features.shape == (45 * 20, 8) and cache.features.dtype == torch.float32
    assert cache.class_names == source.dataset("test").class_names
    on_features = evaluate_features(cache, head, episodes=24, ways=5, shots=2, queries=3, seed=3)
    on_images = evaluate(HeadMethod(encoder, build_head(head)), source.loader("test", 24, seed=3))
    _same_result(on_features, on_images)


def test_natural_images_are_embedded_normalised(mini_folders: Path) -> None:
    source = _mini(mini_folders, meta_batch=2)
    encoder = _conv4((3, 84, 84))
    cache = embed(encoder, source, "test", batch_size=16)
    on_images = evaluate(HeadMethod(encoder, build_head("prototype")), source.loader("test", 10, seed=1))
    _same_result(evaluate_features(cache, "prototype", episodes=10, ways=5, shots=1, queries=1, seed=1),
                 on_images)


class _Pretrained(nn.Module):
    """A stand-in for a pretrained backbone: its reference names its preprocessing."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.linear = nn.Linear(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean((1, 2, 3))[:, None])

    def reference(self) -> dict[str, object]:
        return {"name": "hf:stand-in", "preprocessing": {"size": [self.size, self.size]}}


def _folder(root: Path, image_size: int = 16) -> FewShotSource:
    cfg = Config(task="folder", data_dir=str(root), ways=1, shots=1, queries=0, train_queries=0,
                 task_args={"image_size": image_size})
    return build_source(cfg.validate())


def _same_cache(a: FeatureCache, b: FeatureCache) -> bool:
    return (torch.equal(a.features, b.features) and torch.equal(a.class_sizes, b.class_sizes)
            and (a.class_names, a.key, a.config) == (b.class_names, b.key, b.config))


def test_a_cache_is_kept_while_its_key_holds_and_rebuilt_when_stale(patterns: Path, tmp_path: Path) -> None:
    path = tmp_path / "cache.pt"
    first = embed(_conv4((1, 16, 16)), _folder(patterns), path=path)
    kept = embed(_conv4((1, 16, 16)), _folder(patterns), path=path)
    assert first.seconds is not None and kept.seconds is None and _same_cache(kept, first)
    assert _same_cache(FeatureCache.load(path), first)
    changes = [  # what changed, and the key's fields that say so
        (_conv4((1, 16, 16), seed=1), _folder(patterns), ["backbone.state"]),
        (_conv4((1, 16, 16), seed=1, norm_eps=0.5), _folder(patterns), ["backbone.structure"]),  # eps
        (_Pretrained(224), _folder(patterns), ["backbone.class", "backbone.state", "backbone.structure",
                                               "backbone.name", "backbone.preprocessing"]),
        (_Pretrained(336), _folder(patterns), ["backbone.preprocessing"]),
        (_Pretrained(336), _folder(patterns, 20), ["task_args.image_size", "data.images"]),
    ]
    before = first
    for backbone, source, fields in changes:
        rebuilt = embed(backbone, source, path=path)
        assert rebuilt.seconds is not None and differences(before.key, rebuilt.key) == fields
        assert _same_cache(FeatureCache.load(path), rebuilt)
        before = rebuilt


def test_a_cache_of_changed_data_is_one_error(patterns: Path, tmp_path: Path) -> None:
    root = tmp_path / "patterns"
    shutil.copytree(patterns, root)
    path = tmp_path / "cache.pt"
    embed(_conv4((1, 16, 16)), _folder(root), path=path)
    FeatureCache.load(path).check(path)  # as it was: no error
    test_class = _folder(root).dataset("test").class_names[0]
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / test_class / "0.png")
    with pytest.raises(ConfigError, match=f"^{path}: stale feature cache: its data.images differ"):
        FeatureCache.load(path).check(path)
    shutil.rmtree(root)
    with pytest.warns(UserWarning, match="its data cannot be checked"):
        FeatureCache.load(path).check(path)


def test_a_file_that_is_not_a_cache_is_one_error(tmp_path: Path) -> None:
    for content in (b"", b"not a torch file", pickle.dumps({"features": 1}, protocol=2)):
        (tmp_path / "x.pt").write_bytes(content)
        with pytest.raises(ConfigError, match=f"^{tmp_path / 'x.pt'}: not a metashot feature cache"):
            FeatureCache.load(tmp_path / "x.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="not a metashot feature cache .KeyError"):
        FeatureCache.load(tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="no such feature cache"):
        FeatureCache.load(tmp_path / "none.pt")
