"""Memory-Augmented Neural Networks (Santoro et al., ICML 2016) and their LSTM baseline.

At step t the controller (an LSTM) reads the image x_t with the previous step's label y_{t-1} (the
label of each example arrives one step late) and the memory's reads r_{t-1}; the LRUA memory
(:mod:`metashot.nn.memory`) is written and read from its output h_t; a linear classifier on
[h_t, r_t] predicts y_t. The loss is the cross-entropy summed over the T steps (and over the five
characters of string labels), averaged over the episodes of the batch. ``memory=False`` is the
paper's LSTM baseline: the same controller and classifier without memory (``LSTMBaseline``). The
controller reads raw pixels, as in the paper, or, with a backbone, each image's features (all B * T
images of a batch encoded in one call).

Metrics, per episode: "acc" over all steps, and "acc_n" over the steps that show a class for the
n-th time (n in ``instances``, 1, 2, 3, 4, 5, 10 by default, as the paper's tables); a string label
is right when all five characters are.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import SequenceTaskInfo, TaskInfo
from metashot.methods.base import Method
from metashot.nn.backbones import feature_size
from metashot.nn.memory import LRUAMemory, MemoryState

INSTANCES = (1, 2, 3, 4, 5, 10)


class MANN(Method):
    """A memory-augmented LSTM that classifies a sequence of examples as their labels arrive.

    Args:
        input_size: the flattened image width (400 for 20 x 20), or the encoder's feature size D.
        label_groups, label_values: labels are ``label_groups`` categorical variables of
            ``label_values`` values (one-hot with C classes: 1, C; five-character strings: 5, 5).
        hidden: the controller LSTM's width (200).
        memory: with the LRUA memory (False: the LSTM baseline).
        slots, width, heads, gamma, write_key, strength: the memory's N, M, R, usage decay, write
            vector and initial key strength (see :class:`~metashot.nn.memory.LRUAMemory`); a
            strength of 10 makes reads sharp from the start (cosines lie in [-1, 1], so a strength
            of 1 reads nearly the mean of the 128 rows), which let binding start within ~10,000
            episodes on Omniglot in our runs.
        forget_bias: added to the controller's forget-gate bias at initialisation.
        instances: the presentations n reported as "acc_n".
        encoder: maps images [M, C, H, W] to features [M, D] (None: the raw pixels, the paper's).
        compile: run the recurrence through ``torch.compile`` (True: its default backend, inductor,
            which needs a C++ compiler on CPU; a string: that backend), one graph of ``chunk`` steps
            reused for every chunk of the sequence: the step's many small operations are fused, and
            the compile time does not grow with the sequence. The first compile takes minutes
            (torch caches it on disk for later runs); the numbers in the README.
        classes: the classes of every episode, when known (``build``: the task's): each is shown
            T / classes times in T steps, so which "acc_n" exist is known from the batch's shape and
            the step reads nothing back from the device; None: read from the batch's ``instance`` (one
            host sync per step).

    Batches are :class:`~metashot.batches.SequenceBatch` (x [B, T, ...], y [B, T] or
    [B, T, G], instance [B, T]).
    """

    train_batches = test_batches = "sequences"

    default_backbone: ClassVar[str | None] = None  # raw pixels, as in the paper
    chunk: ClassVar[int] = 10  # steps per call of the recurrence (one compiled graph)

    def __init__(
        self,
        input_size: int,
        label_groups: int = 1,
        label_values: int = 5,
        hidden: int = 200,
        memory: bool = True,
        slots: int = 128,
        width: int = 40,
        heads: int = 4,
        gamma: float = 0.95,
        write_key: bool = False,
        strength: float = 10.0,
        forget_bias: float = 1.0,
        instances: tuple[int, ...] | list[int] = INSTANCES,
        encoder: nn.Module | None = None,
        compile: bool | str = False,
        classes: int | None = None,
    ) -> None:
        super().__init__()
        if compile and not memory:
            raise ValueError("compile applies to the memory's recurrence: the LSTM baseline runs nn.LSTM")
        self.encoder = encoder
        self.input_size, self.hidden = input_size, hidden
        self.label_groups, self.label_values = label_groups, label_values
        self.instances = tuple(instances)
        if classes is not None and classes < 1:
            raise ValueError(f"classes must be at least 1, got {classes}")
        self.classes = classes
        label_size = label_groups * label_values
        self.memory = (
            LRUAMemory(hidden, slots, width, heads, gamma, write_key, strength) if memory else None
        )
        reads = self.memory.read_size if self.memory is not None else 0
        self.step_input = input_size + label_size  # known for all steps before the loop
        # the reads r_{t-1} are the controller's last inputs
        self.controller = nn.LSTM(self.step_input + reads, hidden, batch_first=True)
        self.classifier = nn.Linear(hidden + reads, label_size)
        with torch.no_grad():  # a forget-gate bias of 1 (Jozefowicz et al. 2015)
            self.controller.bias_hh_l0[hidden:2 * hidden] += forget_bias
        self._recurrence = self._steps
        if compile:
            self._recurrence = torch.compile(self._steps, backend="inductor" if compile is True else compile)

    @classmethod
    def build(
        cls, info: TaskInfo, backbone: str | None = None, backbone_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> MANN:
        if not isinstance(info, SequenceTaskInfo):
            raise ValueError("trains on sequence episodes, which this task source does not serve "
                             "(--task omniglot does)")
        encoder = cls.build_backbone(info, backbone, backbone_args)
        size = math.prod(info.input_shape) if encoder is None else feature_size(encoder, info.input_shape)
        kwargs.setdefault("input_size", size)
        kwargs.setdefault("label_groups", info.label_groups)
        kwargs.setdefault("label_values", info.label_values or info.ways)
        kwargs.setdefault("classes", info.ways)
        return cls(encoder=encoder, **kwargs)

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B, T, D + G * K]: each image x [B, T, ...] (its pixels, or its features) with the one-hot label
        of the step before (zeros at t = 0)."""
        b, t = y.shape[:2]
        if self.encoder is not None:
            x = self.encoder(x.flatten(0, 1))
        onehot = F.one_hot(y.reshape(b, t, -1), self.label_values).flatten(2).to(x.dtype)
        previous = F.pad(onehot[:, :-1], (0, 0, 1, 0))
        return torch.cat([x.reshape(b, t, -1), previous], dim=2)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """The classifier's inputs [B, T, H (+ R * M)] for controller inputs [B, T, D + G * K]."""
        if self.memory is None:
            return self.controller(inputs)[0]
        b, t, d = inputs.shape
        lstm = self.controller
        w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
        # The image and label part of every gate pre-activation, for all steps in one product;
        # the loop adds only [h_{t-1}, r_{t-1}] @ W_step.
        pre = F.linear(inputs, w_ih[:, :d], lstm.bias_ih_l0 + lstm.bias_hh_l0)
        w_step = torch.cat([w_hh, w_ih[:, d:]], dim=1).t()
        # The loop multiplies by W_step without recording it; its gradient is taken once over all
        # steps (see _RecurrentWeightGrad) instead of one small product and one accumulation per step.
        recurrent: list[torch.Tensor] = []
        if torch.is_grad_enabled() and w_step.requires_grad:
            pre = _RecurrentWeightGrad.apply(pre, w_step, recurrent)
        pre = pre.unbind(1)
        w_step = w_step.detach()
        c = inputs.new_zeros(b, self.hidden)
        state = self.memory.initial_state(b, inputs.device, inputs.dtype)
        hr = inputs.new_zeros(b, self.hidden + self.memory.read_size)  # [h_{t-1}, r_{t-1}]
        outputs, start = [], hr
        for i in range(0, t, self.chunk):
            out, hr, c, state = self._recurrence(pre[i:i + self.chunk], hr, c, state, w_step)
            outputs.append(out)
        out = torch.cat(outputs, dim=1)
        # the loop's inputs [h, r]_{t-1}, detached: the record must not reach back into the graph that
        # holds it (a cycle through autograd nodes that Python's collector cannot free)
        recurrent.append(torch.cat([start.unsqueeze(1), out[:, :-1]], dim=1).detach())
        return out

    def _steps(
        self, pre: tuple[torch.Tensor, ...], hr: torch.Tensor, c: torch.Tensor, state: MemoryState,
        w_step: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, MemoryState]:
        """The controller and memory over len(pre) steps: gate pre-activations of each step's inputs
        [B, 4H], the last step's [h, r] [B, H + R * M] and cell [B, H], the memory state -> the steps'
        [h, r] [B, len(pre), H + R * M], and the last [h, r], cell and state."""
        hdim = self.hidden
        outputs = []
        for p in pre:
            gates = torch.addmm(p, hr, w_step)
            # nn.LSTM's gate order: input, forget, cell, output
            sig = torch.sigmoid(gates)
            cell = torch.tanh(gates[:, 2 * hdim:3 * hdim])
            c = torch.addcmul(sig[:, hdim:2 * hdim] * c, sig[:, :hdim], cell)
            h = sig[:, 3 * hdim:] * torch.tanh(c)
            r, state = self.memory(h, state)
            hr = torch.cat([h, r], dim=1)  # the classifier's input at t, the controller's at t + 1
            outputs.append(hr)
        return torch.stack(outputs, dim=1), hr, c, state

    def logits(self, batch: Any) -> torch.Tensor:
        """Label logits [B, T, G, K] of every step of ``batch``."""
        z = self.classifier(self.features(self.inputs(batch.x, batch.y)))
        return z.view(*z.shape[:2], self.label_groups, self.label_values)

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(batch)
        b, t = logits.shape[:2]
        y = batch.y.reshape(b, t, -1)
        ce = F.cross_entropy(logits.reshape(-1, self.label_values), y.reshape(-1), reduction="none")
        loss = ce.view(b, -1).sum(1).mean()
        shown = t // self.classes if self.classes is not None else None
        with torch.no_grad():
            return loss, accuracy_by_instance(logits.argmax(-1) == y, batch.instance, self.instances, shown)


class _RecurrentWeightGrad(torch.autograd.Function):
    """Identity on the pre-activations ``pre`` [B, T, 4H] that gives ``w_step`` [K, 4H] its gradient.

    The loop computes gates_t = pre_t + x_t @ W with W detached, so the gradient reaching ``pre`` at
    step t is dL/dgates_t, and dL/dW = sum_t x_t^T dL/dgates_t: one [K, B*T] x [B*T, 4H] product
    over the loop's inputs x_t [B, T, K], which the loop puts (detached) in ``inputs`` when it has run.
    """

    @staticmethod
    def forward(
        ctx: Any, pre: torch.Tensor, w_step: torch.Tensor, inputs: list[torch.Tensor]
    ) -> torch.Tensor:
        ctx.inputs = inputs
        return pre.view_as(pre)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (x,) = ctx.inputs  # [B, T, K]
        ctx.inputs = None
        return grad, x.flatten(0, 1).t().mm(grad.flatten(0, 1)), None


def accuracy_by_instance(
    correct: torch.Tensor, instance: torch.Tensor, instances: tuple[int, ...] = INSTANCES,
    shown: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-episode accuracy [B] overall ("acc") and at each n-th presentation ("acc_n").

    correct: [B, T] or [B, T, G] (a step is right when all G label characters are); instance: [B, T].
    ``shown``: how many times every episode shows each of its classes, when known, giving "acc_n" for
    n <= shown without a read from the device; None: an "acc_n" is left out unless every episode shows
    a class n times (one host read for all n).
    """
    if correct.dim() == 3:
        correct = correct.all(-1)
    correct = correct.float()
    metrics = {"acc": correct.mean(1)}
    at = [(instance == n).float() for n in instances]
    counts = [a.sum(1) for a in at]
    if shown is not None:
        present = [n <= shown for n in instances]
    else:
        present = torch.stack([c > 0 for c in counts]).all(1).tolist() if counts else []
    for n, a, count, p in zip(instances, at, counts, present):
        if p:
            metrics[f"acc_{n}"] = (correct * a).sum(1) / count
    return metrics


class LSTMBaseline(MANN):
    """The paper's LSTM baseline: :class:`MANN` without the memory (``memory=False``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["memory"] = False
        super().__init__(*args, **kwargs)
