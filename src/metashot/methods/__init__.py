"""Meta-learning methods, each in its own file, all meeting :class:`~metashot.methods.base.Method`."""

from metashot.methods.base import Method, TaskInfo
from metashot.methods.kernel import MetricMethod, RBFKernel, class_log_probs
from metashot.methods.maml import MAML, MAMLRegression
from metashot.methods.mann import MANN, LSTMBaseline
from metashot.methods.matching import MatchingKernel, MatchingNetwork
from metashot.methods.protonet import ProtoNet, PrototypeKernel

METHODS: dict[str, type[Method]] = {
    "protonet": ProtoNet,
    "matching": MatchingNetwork,
    "maml": MAML,
    "mann": MANN,
    "lstm": LSTMBaseline,
}

__all__ = [
    "LSTMBaseline",
    "MANN",
    "METHODS",
    "MAML",
    "MAMLRegression",
    "MatchingKernel",
    "MatchingNetwork",
    "Method",
    "MetricMethod",
    "PrototypeKernel",
    "ProtoNet",
    "RBFKernel",
    "TaskInfo",
    "class_log_probs",
]
