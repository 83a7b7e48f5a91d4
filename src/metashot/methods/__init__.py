"""Meta-learning methods, each in its own file, all meeting :class:`~metashot.methods.base.Method`."""

from typing import Any

from torch import nn

from metashot.batches import TaskInfo
from metashot.config import Config
from metashot.errors import ConfigError
from metashot.methods import kernel
from metashot.methods.base import Method
from metashot.methods.baseline import Baseline
from metashot.methods.finetune import CosineHead, FineTune, LinearHead
from metashot.methods.heads import CL2N, Head, HeadMethod
from metashot.methods.kernel import KernelMethod, RBFKernel, class_log_probs
from metashot.methods.logistic import LogisticHead
from metashot.methods.maml import MAML, MAMLRegression
from metashot.methods.mann import MANN, LSTMBaseline
from metashot.methods.matching import MatchingKernel, MatchingNetwork
from metashot.methods.metabaseline import MetaBaseline
from metashot.methods.protonet import ProtoNet, PrototypeHead, PrototypeKernel
from metashot.methods.rfs import RFS
from metashot.methods.ridge import R2D2, RidgeHead
from metashot.methods.simpleshot import SimpleShot

METHODS: dict[str, type[Method]] = {
    "protonet": ProtoNet,
    "matching": MatchingNetwork,
    "maml": MAML,
    "mann": MANN,
    "lstm": LSTMBaseline,
    "baseline": Baseline,
    "rfs": RFS,
    "simpleshot": SimpleShot,
    "meta-baseline": MetaBaseline,
    "r2d2": R2D2,
}

HEADS: dict[str, type[nn.Module]] = {
    "prototype": PrototypeHead,
    "cl2n": CL2N,
    "linear": LinearHead,
    "cosine": CosineHead,
    "ridge": RidgeHead,
    "logistic": LogisticHead,
    "finetune": FineTune,
}


def build_head(name: str, **args: Any) -> nn.Module:
    """The head ``name`` of :data:`HEADS` with ``args``, else a :class:`ConfigError` naming the known ones
    or the argument that does not fit."""
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; known: {', '.join(sorted(HEADS))}")
    try:
        return HEADS[name](**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"head args {args} do not fit {name}: {e}") from None


def method_class(cfg: Config) -> type[Method]:
    """The class of the config's method, else a :class:`ConfigError` listing the known ones."""
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method]


def build_method(cfg: Config, info: TaskInfo) -> Method:
    """The config's method built for tasks ``info`` with its ``method_args``, on the config's backbone
    (built with ``backbone_args``; null: the method's own)."""
    name, args = cfg.method, cfg.method_args
    method_class(cfg)
    try:
        return METHODS[name].build(info, backbone=cfg.backbone, backbone_args=cfg.backbone_args, **args)
    except TypeError as e:
        if "keyword argument" not in str(e):
            raise
        raise ConfigError(f"method_args {args} do not fit {name}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


__all__ = [
    "Baseline",
    "MetaBaseline",
    "RFS",
    "SimpleShot",
    "CL2N",
    "CosineHead",
    "FineTune",
    "LinearHead",
    "LogisticHead",
    "R2D2",
    "RidgeHead",
    "HEADS",
    "Head",
    "HeadMethod",
    "PrototypeHead",
    "build_head",
    "LSTMBaseline",
    "MANN",
    "METHODS",
    "MAML",
    "MAMLRegression",
    "MatchingKernel",
    "KernelMethod",
    "MatchingNetwork",
    "Method",
    "PrototypeKernel",
    "ProtoNet",
    "RBFKernel",
    "TaskInfo",
    "build_method",
    "method_class",
    "class_log_probs",
]


def __getattr__(name: str) -> object:
    return getattr(kernel, name)  # MetricMethod, KernelMethod's deprecated name
