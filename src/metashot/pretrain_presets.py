"""Presets of the methods with a supervised pretraining stage, and of R2D2: one named recipe per paper
table cell, merged into :data:`metashot.presets.PRESETS`.

A preset's name holds its network only where it is not the paper's own (the natural-image presets of
rfs, simpleshot and meta-baseline are ResNet-12, as their papers; those of baseline are Conv4).

The pretraining methods train on plain labelled minibatches of every training class (``batch_size``
examples per step); their episode shape is only the test's. Steps count minibatches: an epoch of
miniImageNet's 38,400 training images is 600 steps at batch 64.
"""

from __future__ import annotations

from metashot.config import Config
from metashot.stages import Stages

IMAGE_SETS = ("miniimagenet", "tieredimagenet", "cifar-fs", "fc100", "cub")
# training images per part, to turn the papers' epochs into steps
TRAIN_IMAGES = {"miniimagenet": 38_400, "tieredimagenet": 448_695, "cifar-fs": 38_400, "fc100": 36_000,
                "cub": 5_885}


def epochs(task: str, n: float, batch: int) -> int:
    """``n`` epochs of ``task``'s training images in steps of ``batch``."""
    return round(n * TRAIN_IMAGES[task] / batch)


def _omniglot_classifier(method: str, classifier: str, ways: int, shots: int) -> Config:
    # Pretraining on Omniglot's training characters (each rotation its own class, as the episodic
    # presets), Conv4, no augmentation. The papers give no Omniglot recipe for these methods; Adam 1e-3
    # (CloserLook's optimiser) at batch 64 for 20,000 steps (about 15 epochs), halved every 5,000; the
    # checkpoint picked by few-shot validation accuracy through the method's head; 1,000 test episodes.
    return Config(
        method=method, method_args={"classifier": classifier}, ways=ways, shots=shots, queries=15,
        batch_size=64, steps=20_000, optimizer="adam", lr=1e-3, schedule="step", lr_step=5_000,
        lr_gamma=0.5, val_every=1_000, val_episodes=200, test_episodes=1_000,
    )


def _closerlook(task: str, classifier: str, shots: int) -> Config:
    # Chen et al. ICLR 2019 (Sec. 4.1 and their code): Conv4, Adam 1e-3, batch 16, 400 epochs on
    # miniImageNet (200 on CUB), random-resized crop + colour jitter + flip, ImageNet normalisation
    # (here the dataset's); test: a new classifier of the same kind fitted on the support features
    # (the fitted heads' own recipe, 100 steps); 600 test episodes of 16 queries, here 15.
    n = 200 if task == "cub" else 400
    return Config(
        method="baseline", method_args={"classifier": classifier}, task=task,
        task_args={"augment": "resized-crop"}, ways=5, shots=shots, queries=15,
        batch_size=16, steps=epochs(task, n, 16), optimizer="adam", lr=1e-3, schedule="constant",
        val_every=5_000, val_episodes=200, test_episodes=600,
    )


def _rfs(task: str, method: str, shots: int) -> Config:
    # Tian et al. ECCV 2020: ResNet-12 pretrained on the training classes with SGD 0.05,
    # momentum 0.9, weight decay 5e-4, batch 64, 100 epochs, x0.1 at epochs 60 and 80 (their
    # miniImageNet schedule, used here for every dataset), RandomCrop + jitter + flip; 600 test episodes.
    # RFS merges train and val for pretraining; here val picks the checkpoint. The same pretraining
    # serves SimpleShot (CL2N head), whose own paper trains longer with another schedule.
    return Config(
        method=method, task=task, task_args={"augment": "crop-jitter-flip"}, backbone="resnet12",
        ways=5, shots=shots, queries=15, batch_size=64, steps=epochs(task, 100, 64), optimizer="sgd",
        lr=0.05, weight_decay=5e-4, optimizer_args={"momentum": 0.9}, schedule="multistep",
        lr_milestones=[epochs(task, 60, 64), epochs(task, 80, 64)], lr_gamma=0.1,
        val_every=epochs(task, 5, 64), val_episodes=200, test_episodes=600,
    )


def _meta_stage(stage1: Config, train_queries: int, steps: int, meta_batch: int = 1) -> Config:
    # Meta-Baseline's second stage (Chen et al. ICCV 2021, Sec. 4.1): the first stage's encoder, ProtoNet
    # with cosine and a learned scale from 10, episodes of the test shape, SGD 1e-3 with momentum 0.9 and
    # weight decay 5e-4, constant; its length (``steps`` episodes) is metashot's choice.
    return Config(
        method="meta-baseline", task=stage1.task, task_args=dict(stage1.task_args), backbone=stage1.backbone,
        ways=stage1.ways, shots=stage1.shots, queries=15, train_queries=train_queries,
        meta_batch=meta_batch, steps=steps, optimizer="sgd", lr=1e-3, weight_decay=5e-4,
        optimizer_args={"momentum": 0.9}, schedule="constant", val_every=500, val_episodes=200,
        test_episodes=stage1.test_episodes, init_from="stage:1", init_prefix="encoder.",
    )


def _omniglot_meta_baseline(ways: int, shots: int) -> Stages:
    # Stage 1 is the Classifier-Baseline: the baseline-omniglot linear recipe, tested with prototypes
    # on cosine (the rule stage 2 trains). --max-minutes goes 3 : 1 to the stages.
    stage1 = _omniglot_classifier("baseline", "linear", ways, shots).override(
        method_args={"head": "prototype", "head_args": {"distance": "cosine"}})
    return Stages([stage1, _meta_stage(stage1, 15 if ways == 5 else 5, 10_000)], budget=[3, 1])


def _image_meta_baseline(task: str, shots: int) -> Stages:
    # Stage 1, Classifier-Baseline (Sec. 4.1): ResNet-12, SGD 0.1, momentum 0.9, weight decay 5e-4,
    # batch 128, 100 epochs, x0.1 at epoch 90, RandomResizedCrop + flip (no colour jitter); stage 2 as
    # _meta_stage with 5-way 15-query episodes, 4 per step, 20,000 steps, the same augmentation.
    stage1 = Config(
        method="baseline", method_args={"classifier": "linear", "head": "prototype",
                                        "head_args": {"distance": "cosine"}},
        task=task, task_args={"augment": "resized-crop", "jitter": 0.0}, backbone="resnet12", ways=5,
        shots=shots,
        queries=15, batch_size=128, steps=epochs(task, 100, 128), optimizer="sgd", lr=0.1,
        weight_decay=5e-4, optimizer_args={"momentum": 0.9}, schedule="multistep",
        lr_milestones=[epochs(task, 90, 128)], lr_gamma=0.1, val_every=epochs(task, 5, 128),
        val_episodes=200, test_episodes=600,
    )
    return Stages([stage1, _meta_stage(stage1, 15, 20_000, meta_batch=4)], budget=[3, 1])


def _omniglot_r2d2(ways: int, shots: int) -> Config:
    # Bertinetto et al. ICLR 2019 with the ProtoNet presets' Omniglot episodes (60-way training with 5
    # queries per class, the test shot) and optimiser (Adam 1e-3 halved every 2,000 episodes), Conv4;
    # the ridge head's lambda, scale and bias learned (RidgeHead's initial values).
    return Config(
        method="r2d2", ways=ways, shots=shots, queries=15, train_ways=60, train_shots=shots,
        train_queries=5, steps=20_000, optimizer="adam", lr=1e-3, schedule="step", lr_step=2_000,
        lr_gamma=0.5, val_every=500, val_episodes=200, test_episodes=1_000,
    )


def _image_r2d2(task: str, shots: int) -> Config:
    # R2D2 on CIFAR-FS / miniImageNet: 16-way training episodes (more ways than the test's, as the
    # paper trains), 15 queries, the test shot; Adam 1e-3 halved every 2,000 episodes, 20,000 episodes,
    # crop-jitter-flip; the paper's four-block 96-192-384-512 network is approximated by Conv4 (its
    # ``hidden`` width: --backbone-args). 1,000 test episodes.
    return Config(
        method="r2d2", task=task, task_args={"augment": "crop-jitter-flip"}, ways=5, shots=shots, queries=15,
        train_ways=16, train_queries=15, steps=20_000, optimizer="adam", lr=1e-3, schedule="step",
        lr_step=2_000, lr_gamma=0.5, val_every=500, val_episodes=200, test_episodes=1_000,
    )


OMNIGLOT_CELLS = [(w, 1) for w in (5, 20)] + [(w, 5) for w in (5, 20)]

PRETRAIN_PRESETS: dict[str, Config | Stages] = {
    **{f"baseline-omniglot-{w}w{k}s": _omniglot_classifier("baseline", "linear", w, k)
       for w, k in OMNIGLOT_CELLS},
    **{f"baselinepp-omniglot-{w}w{k}s": _omniglot_classifier("baseline", "cosine", w, k)
       for w, k in OMNIGLOT_CELLS},
    **{f"rfs-omniglot-{w}w{k}s": _omniglot_classifier("rfs", "linear", w, k) for w, k in OMNIGLOT_CELLS},
    **{f"simpleshot-omniglot-{w}w{k}s": _omniglot_classifier("simpleshot", "linear", w, k)
       for w, k in OMNIGLOT_CELLS},
    **{f"baseline-{d}-5w{k}s": _closerlook(d, "linear", k) for d in IMAGE_SETS for k in (1, 5)},
    **{f"baselinepp-{d}-5w{k}s": _closerlook(d, "cosine", k) for d in IMAGE_SETS for k in (1, 5)},
    **{f"rfs-{d}-5w{k}s": _rfs(d, "rfs", k) for d in IMAGE_SETS for k in (1, 5)},
    **{f"simpleshot-{d}-5w{k}s": _rfs(d, "simpleshot", k) for d in IMAGE_SETS for k in (1, 5)},
    **{f"meta-baseline-omniglot-{w}w{k}s": _omniglot_meta_baseline(w, k) for w, k in OMNIGLOT_CELLS},
    **{f"meta-baseline-{d}-5w{k}s": _image_meta_baseline(d, k) for d in IMAGE_SETS for k in (1, 5)},
    **{f"r2d2-omniglot-{w}w{k}s": _omniglot_r2d2(w, k) for w, k in OMNIGLOT_CELLS},
    **{f"r2d2-{d}-5w{k}s": _image_r2d2(d, k) for d in ("cifar-fs", "miniimagenet") for k in (1, 5)},
}
PRETRAIN_DEFAULTS = {
    "baseline": "baseline-omniglot-5w1s",
    "rfs": "rfs-omniglot-5w1s",
    "simpleshot": "simpleshot-omniglot-5w1s",
    "r2d2": "r2d2-omniglot-5w1s",
}
