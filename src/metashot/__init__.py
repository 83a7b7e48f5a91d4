"""metashot: meta-learning in PyTorch, the papers' methods with the papers' protocols."""

from metashot.config import Config
from metashot.data import Episode, EpisodeSampler, FewShotDataset, Omniglot, episode_loader
from metashot.evaluate import Result, evaluate
from metashot.methods import METHODS, KernelMethod, Method, ProtoNet, RBFKernel, kernel
from metashot.nn import MLP, Conv4
from metashot.predict import FewShotClassifier
from metashot.runs import evaluate_run
from metashot.train import Trainer, train

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "MLP",
    "Config",
    "Conv4",
    "Episode",
    "EpisodeSampler",
    "FewShotClassifier",
    "FewShotDataset",
    "KernelMethod",
    "Method",
    "Omniglot",
    "ProtoNet",
    "RBFKernel",
    "Result",
    "Trainer",
    "episode_loader",
    "evaluate",
    "evaluate_run",
    "train",
]


def __getattr__(name: str) -> object:
    return getattr(kernel, name)  # MetricMethod, KernelMethod's deprecated name
