"""Presets: one named recipe per paper table cell. ``metashot presets`` lists them.

A preset is a :class:`Config`, or a recipe of several stages trained one after another: a list of configs,
stage 1 first, or :class:`metashot.stages.Stages` (the same, with the shares of ``--max-minutes``); see
:mod:`metashot.stages`.
"""

from __future__ import annotations

from metashot.config import Config, stage_marker
from metashot.data.sequences import SequenceTask
from metashot.data.tasks import TASKS
from metashot.errors import ConfigError
from metashot.pretrain_presets import PRETRAIN_DEFAULTS, PRETRAIN_PRESETS
from metashot.stages import Stages


def _omniglot_protonet(ways: int, shots: int) -> Config:
    # Snell et al. 2017: 60-way training episodes with 5 queries per class, shot = test shot;
    # Adam 1e-3 halved every 2,000 episodes; 1,000 test episodes.
    return Config(
        method="protonet", ways=ways, shots=shots, queries=15,
        train_ways=60, train_shots=shots, train_queries=5,
        steps=20_000, optimizer="adam", lr=1e-3, schedule="step", lr_step=2_000, lr_gamma=0.5,
        val_every=500, val_episodes=200, test_episodes=1_000,
    )


# The paper's softmax over plain cosines (scale 1) is soft: cosines of ReLU embeddings lie in [0, 1], so
# the weights of a 5-way 1-shot episode cannot pass e / (e + 4) = 0.40 (README: both measured).
# ``--set method_args='{"scale": 1}'`` gives the paper's kernel.
MATCHING_SCALE = 20.0


def _omniglot_matching(ways: int, shots: int) -> Config:
    # Vinyals et al. 2016: Conv4, 28x28, 1,200 training characters with rotations (the random split;
    # 172 of them held out to pick the checkpoint, as ProtoNet: the paper names no validation set);
    # training tasks match the test ways and shots, as in the paper; cosine attention without FCE
    # (their Omniglot rows; FCE: --set method_args='{"fce": true}'). The paper gives neither
    # optimiser nor query count: Adam 1e-3 halved every 2,000 episodes as ProtoNet, and 75-100 training
    # queries per episode (15 per class at 5-way, 5 at 20-way, so 20-way fits a CPU); 1,000 test episodes.
    # The cosine is multiplied by MATCHING_SCALE before the softmax (see its comment).
    return Config(
        method="matching", method_args={"fce": False, "scale": MATCHING_SCALE}, ways=ways, shots=shots,
        queries=15,
        train_queries=15 if ways <= 5 else 5,
        steps=20_000, optimizer="adam", lr=1e-3, schedule="step", lr_step=2_000, lr_gamma=0.5,
        val_every=500, val_episodes=200, test_episodes=1_000,
    )


# cbfinn/maml normalises with tf.contrib.layers.batch_norm's defaults: epsilon 1e-3, no learned scale. The
# convolutions go without the bias the batch norm cancels: its gradient is rounding noise, which Adam turns
# into weights that differ between the loop and vmap or 1 and N processes (README, MAML).
MAML_BACKBONE_ARGS = {"norm_eps": 1e-3, "norm_scale": False, "conv_bias": False}


def _omniglot_maml(ways: int, shots: int) -> Config:
    # Finn et al. 2017 (appendix A.1 and the authors' code): strided Conv4 with batch statistics; 5-way:
    # 1 inner step with alpha 0.4, meta-batch 32, tested with 3 steps; 20-way: 5 steps with alpha 0.1 in
    # training and test, meta-batch 16; Adam 1e-3, constant; 60,000 meta-iterations; query = shot per
    # class in training and test; 600 test tasks. Batch norm as the authors' (MAML_BACKBONE_ARGS).
    five = ways == 5
    return Config(
        method="maml",
        method_args={"inner_lr": 0.4 if five else 0.1, "inner_steps": 1 if five else 5,
                     "test_inner_steps": 3 if five else 5},
        backbone="conv4-strided", backbone_args=dict(MAML_BACKBONE_ARGS),
        ways=ways, shots=shots, queries=shots, train_queries=shots, meta_batch=32 if five else 16,
        steps=60_000, optimizer="adam", lr=1e-3, schedule="constant",
        val_every=500, val_episodes=320, test_episodes=600,
    )


def _omniglot_mamlpp(ways: int, shots: int) -> Config:
    # Antoniou et al. 2019 (MAML++), section 4, with the authors' released Omniglot configs
    # (HowToTrainYourMAMLPytorch, experiment_config/omniglot_maml++-omniglot_{shots}_8_0.1_64_{ways}_0.json):
    # 5 inner steps in training and test; per-layer per-step rates (LSLR) from 0.1; per-step batch norm;
    # the multi-step loss annealed over the first 10 epochs of 500 iterations; meta-batch 8 at 5 and 20
    # ways; 100 epochs of 500 iterations; Adam 1e-3 with cosine annealing to 1e-5;
    # 600 test tasks. First order for the first 50 epochs: the paper's derivative-order annealing (the
    # released configs train second order throughout). Their code normalises with each batch's
    # statistics (its per-step running statistics are kept, never used), as here: per-step scale and
    # shift; --set method_args='{"batch_norm": "inductive"}' adds per-step running statistics. Unlike
    # theirs, the network is the MAML presets' strided Conv4 (theirs max-pools) and the query is the
    # MAML presets' shot per class (theirs 1).
    return Config(
        method="maml",
        method_args={"inner_lr": 0.1, "inner_steps": 5, "test_inner_steps": 5, "learned_lr": "lslr",
                     "per_step_bn": True, "msl_steps": 10 * 500, "first_order_steps": 50 * 500},
        ways=ways, shots=shots, queries=shots, train_queries=shots, meta_batch=8,
        steps=100 * 500, optimizer="adam", lr=1e-3, schedule="cosine", lr_min=1e-5,
        val_every=500, val_episodes=320, test_episodes=600,
    )


def _omniglot_anil(ways: int, shots: int) -> Config:
    # Raghu et al. 2020 (ANIL), section 4: MAML's Omniglot recipe, whose hyperparameters the paper
    # keeps, with only the head (the last linear layer) adapted in the inner loop.
    cfg = _omniglot_maml(ways, shots)
    return cfg.replace(method_args={**cfg.method_args, "inner_params": "head"})


def _omniglot_metasgd(ways: int, shots: int) -> Config:
    # Li et al. 2017 (Meta-SGD), section 3: MAML's network and Omniglot recipe, adapting in one step in
    # training and test with a learned rate per parameter element, initialised to MAML's alpha.
    cfg = _omniglot_maml(ways, shots)
    args = {**cfg.method_args, "learned_lr": "metasgd", "inner_steps": 1, "test_inner_steps": 1}
    return cfg.replace(method_args=args)


def _sinusoid_maml() -> Config:
    # Finn et al. 2017, section 5.1: MLP 1-40-40-1, one inner step with alpha 0.01, K = 10 support and 10
    # query points in training, meta-batch 25, Adam 1e-3, 70,000 meta-iterations; tested with K = 5 and
    # up to 10 steps on 600 tasks. The test MSE is measured on 100 query points per task (the authors'
    # code uses K; the expectation is the same, the variance lower).
    return Config(
        method="maml", task="sinusoid",
        method_args={"inner_lr": 0.01, "inner_steps": 1, "test_inner_steps": 10},
        ways=1, shots=5, queries=100, train_shots=10, train_queries=10, meta_batch=25,
        steps=70_000, optimizer="adam", lr=1e-3, schedule="constant",
        val_every=1_000, val_episodes=500, test_episodes=600,
    )


# The paper's RMSProp: learning rate 1e-4, decay 0.95, momentum 0.9 (torch's alpha and momentum).
MANN_OPTIMIZER = {"optimizer": "rmsprop", "lr": 1e-4, "optimizer_args": {"alpha": 0.95, "momentum": 0.9}}


def _omniglot_mann(classes: int, labels: str, memory: bool = True) -> Config:
    # Santoro et al. 2016: 20x20 Omniglot, rotations by 90 degrees as new classes plus random small
    # rotations and translations in training; episodes of `classes` classes x 10 instances with
    # labels shuffled per episode; LSTM controller of 200, memory 128 x 40, 4 read heads; batches of
    # 16 episodes; 100,000 episodes (6,250 steps); RMSProp (MANN_OPTIMIZER), constant. The checkpoint
    # is picked on all-step accuracy over 320 validation episodes; 1,000 test episodes, accuracy by
    # instance (acc_1 ... acc_10).
    return Config(
        method="mann" if memory else "lstm", task="omniglot",
        method_args={"hidden": 200} | ({"slots": 128, "width": 40, "heads": 4} if memory else {}),
        task_args={"instances": 10, "labels": labels, "image_size": 20, "split": "random"},
        ways=classes, shots=1, meta_batch=16, steps=100_000 // 16, **MANN_OPTIMIZER, schedule="constant",
        val_every=250, val_episodes=320, test_episodes=1_000,
    )


# The natural-image benchmarks (BRIEF section 8): each preset states its augmentation in task_args; all
# normalise with the dataset's mean and std; 600 test episodes of 15 queries unless the paper says otherwise.
IMAGE_SETS = ("miniimagenet", "tieredimagenet", "cifar-fs", "fc100", "cub")


def _image_protonet(task: str, shots: int) -> Config:
    # Snell et al. 2017, miniImageNet: Conv4, 30-way training episodes for 1-shot and 20-way for 5-shot,
    # 15 queries per class, shot = test shot, no augmentation; Adam 1e-3 halved every 2,000 episodes; their
    # code stops on the validation loss, here 20,000 episodes with the best validation checkpoint kept.
    return Config(
        method="protonet", task=task, task_args={"augment": "none"},
        ways=5, shots=shots, queries=15, train_ways=30 if shots == 1 else 20, train_queries=15,
        steps=20_000, optimizer="adam", lr=1e-3, schedule="step", lr_step=2_000, lr_gamma=0.5,
        val_every=500, val_episodes=200, test_episodes=600,
    )


def _image_protonet_resnet12(task: str, shots: int) -> Config:
    # FEAT's code (Ye et al. 2020), its ProtoNet row: ResNet-12, 5-way 15-query episodes, distances divided
    # by a temperature of 64, SGD (momentum 0.9, Nesterov, weight decay 5e-4) at 2e-4 halved every 40
    # epochs of 100 episodes, 200 epochs, no augmentation; 10,000 test episodes. FEAT starts from a
    # ResNet-12 pretrained on the 64 training classes (its 62.39 / 80.53 need that stage); this trains
    # from scratch.
    return Config(
        method="protonet", method_args={"temperature": 64.0}, task=task, task_args={"augment": "none"},
        backbone="resnet12", ways=5, shots=shots, queries=15, train_queries=15,
        steps=20_000, optimizer="sgd", lr=2e-4, weight_decay=5e-4,
        optimizer_args={"momentum": 0.9, "nesterov": True}, schedule="step", lr_step=4_000, lr_gamma=0.5,
        val_every=500, val_episodes=200, test_episodes=10_000,
    )


def _image_matching(task: str, shots: int) -> Config:
    # Vinyals et al. 2016, miniImageNet: Conv4, cosine attention without FCE, training episodes of the
    # test shape; no optimiser is given: Adam 1e-3 halved every 2,000 episodes as ProtoNet, 15 queries.
    # The cosine is scaled by 20 before the softmax, as the Omniglot presets (MATCHING_SCALE).
    return Config(
        method="matching", method_args={"fce": False, "scale": MATCHING_SCALE}, task=task,
        task_args={"augment": "none"},
        ways=5, shots=shots, queries=15, train_queries=15,
        steps=20_000, optimizer="adam", lr=1e-3, schedule="step", lr_step=2_000, lr_gamma=0.5,
        val_every=500, val_episodes=200, test_episodes=600,
    )


def _image_maml(task: str, shots: int) -> Config:
    # Finn et al. 2017, miniImageNet (section 5.2 and the authors' code): the max-pooled Conv4 with 32
    # filters and the authors' batch norm (MAML_BACKBONE_ARGS), 5 inner steps with alpha 0.01 in training and
    # 10 at test, meta-batch 4 for 1-shot and 2 for 5-shot, 15 queries per class, Adam 1e-3, constant,
    # 60,000 meta-iterations, second order, no augmentation; 600 test tasks.
    return Config(
        method="maml", method_args={"inner_lr": 0.01, "inner_steps": 5, "test_inner_steps": 10},
        task=task, task_args={"augment": "none"},
        backbone="conv4", backbone_args={"hidden": 32, **MAML_BACKBONE_ARGS},
        ways=5, shots=shots, queries=15, train_queries=15, meta_batch=4 if shots == 1 else 2,
        steps=60_000, optimizer="adam", lr=1e-3, schedule="constant",
        val_every=500, val_episodes=200, test_episodes=600,
    )


CELLS = [(w, k) for w in (5, 20) for k in (1, 5)]
PRESETS: dict[str, Config | list[Config] | Stages] = {
    **{f"protonet-omniglot-{w}w{k}s": _omniglot_protonet(w, k) for w, k in CELLS},
    **{f"matching-omniglot-{w}w{k}s": _omniglot_matching(w, k) for w, k in CELLS},
    **{f"maml-omniglot-{w}w{k}s": _omniglot_maml(w, k) for w, k in CELLS},
    **{f"mamlpp-omniglot-{w}w{k}s": _omniglot_mamlpp(w, k) for w, k in CELLS},
    **{f"anil-omniglot-{w}w1s": _omniglot_anil(w, 1) for w in (5, 20)},
    **{f"metasgd-omniglot-{w}w1s": _omniglot_metasgd(w, 1) for w in (5, 20)},
    "maml-sinusoid": _sinusoid_maml(),
    "mann-omniglot-5class-onehot": _omniglot_mann(5, "onehot"),
    "mann-omniglot-15class-string": _omniglot_mann(15, "string"),
    "lstm-omniglot-5class-onehot": _omniglot_mann(5, "onehot", memory=False),
    **{f"protonet-{d}-5w{k}s": _image_protonet(d, k) for d in IMAGE_SETS for k in (1, 5)},
    **{f"maml-{d}-5w{k}s": _image_maml(d, k) for d in IMAGE_SETS for k in (1, 5)},
    **{f"protonet-{d}-resnet12-5w{k}s": _image_protonet_resnet12(d, k)
       for d in ("miniimagenet", "tieredimagenet") for k in (1, 5)},
    **{f"matching-miniimagenet-5w{k}s": _image_matching("miniimagenet", k) for k in (1, 5)},
    **PRETRAIN_PRESETS,
}
DEFAULT_PRESET = {
    "protonet": "protonet-omniglot-5w1s",
    "matching": "matching-omniglot-5w1s",
    "maml": "maml-omniglot-5w1s",
    "mann": "mann-omniglot-5class-onehot",
    "lstm": "lstm-omniglot-5class-onehot",
    "meta-baseline": "meta-baseline-omniglot-5w1s",
    **PRETRAIN_DEFAULTS,
}


def default_preset(method: str, task: str | None = None) -> str | None:
    """The preset ``metashot train METHOD [--task TASK]`` starts from: the method's default, or,
    when ``task`` is not its task, the first preset (by name) of that method and task, if any (for a
    staged preset: of its last stage, the one tested)."""
    name = DEFAULT_PRESET.get(method)
    if task is None or (name is not None and _tested(PRESETS[name]).task == task):
        return name
    same = sorted(n for n, c in PRESETS.items() if _tested(c).method == method and _tested(c).task == task)
    return same[0] if same else name


def _tested(preset: Config | list[Config] | Stages) -> Config:
    """A preset's config, or its last stage's."""
    if isinstance(preset, Config):
        return preset
    return preset.configs[-1] if isinstance(preset, Stages) else preset[-1]


def describe(cfg: Config) -> str:
    """One line: the method, the task and its shape, the training length, the augmentation if any, the
    weights it starts from if any."""
    from metashot.methods import method_class

    shape = TASKS[cfg.task].shape(cfg)
    batch = f" in meta-batches of {cfg.meta_batch}" if cfg.meta_batch > 1 else ""
    if method_class(cfg).train_batches == "sequences":
        shape = SequenceTask.shape(cfg)
    if method_class(cfg).train_batches == "examples":
        shape = f"{cfg.ways}-way {cfg.shots}-shot at test, trained on every training class"
        batch = f" of {cfg.batch_size} examples"
    augment = f"; augmentation {cfg.task_args['augment']}" if "augment" in cfg.task_args else ""
    start = ""
    if cfg.init_from is not None:
        j = stage_marker(cfg.init_from)
        start = f"; from {f'stage {j}' if j else cfg.init_from}'s {cfg.init_prefix or 'weights'}"
    return f"{cfg.method} on {cfg.task}: {shape}; {cfg.steps} steps{batch}{augment}{start}"


def table() -> str:
    """What ``metashot presets`` lists: one line per preset, and one per stage of a staged one."""
    lines = []
    for name, preset in sorted(PRESETS.items()):
        if isinstance(preset, Config):
            lines.append(f"{name:38} {describe(preset)}")
            continue
        recipe = stages(name)
        shares = " / ".join(f"{100 * s:.0f}%" for s in recipe.shares)
        lines.append(f"{name:38} {len(recipe.configs)} stages, --max-minutes shared {shares}:")
        lines += [f"{f'  stage {k}':38} {describe(c)}" for k, c in enumerate(recipe.configs, 1)]
    return "\n".join(lines)


def _known(name: str) -> None:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")


def is_staged(name: str) -> bool:
    """Whether the preset ``name`` (known) is a recipe of stages."""
    _known(name)
    return not isinstance(PRESETS[name], Config)


def get(name: str) -> Config:
    """The preset ``name``, with ``preset`` set to its name; a staged one is :func:`stages`'."""
    if is_staged(name):
        raise ConfigError(f"preset {name!r} is a recipe of {len(stages(name).configs)} stages: "
                          f"`metashot train --preset {name}` trains them")
    return PRESETS[name].replace(preset=name)


def stages(name: str) -> Stages:
    """The staged preset ``name``, each stage's ``preset`` set to its name."""
    if not is_staged(name):
        raise ConfigError(f"preset {name!r} is one run, not a recipe of stages")
    preset = PRESETS[name]
    recipe = preset if isinstance(preset, Stages) else Stages(preset)
    return Stages([c.replace(preset=name) for c in recipe.configs], recipe.budget)
