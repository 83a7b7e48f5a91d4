"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), on ``torch.func``.

For every task T_i of a meta-batch the inner loop adapts the parameters theta on the support set
(the paper's eq. 1, repeated ``inner_steps`` times):

    theta_i' = theta - alpha * grad_theta L_{T_i}^{support}(f_theta)

and the outer loop (eq. 3, the gradient of the meta-objective of eq. 2; Algorithm 2) updates theta
with the gradient of the query losses at the adapted parameters, taken through the inner steps:

    theta <- theta - beta * grad_theta sum_i L_{T_i}^{query}(f_{theta_i'})

The meta-gradient of one task is (I - alpha * H_support(theta)) grad L^query(theta_i') for one step:
second order. ``first_order=True`` (FOMAML) drops the Hessian terms, using grad L^query(theta_i')
itself. The outer step is Adam in the trainer; ``loss`` returns the mean (not the sum) of the query
losses over the meta-batch, as the authors' code does (Adam does not see the difference).

The model is any ``nn.Module``; it is called through ``torch.func.functional_call`` with the adapted
parameters, so nothing is deep-copied and no module is patched.

Batch norm (the paper's semantics, the default ``batch_norm="transductive"``): every forward pass
normalises with its own batch's statistics (support and query passes separately), at meta-training
and meta-test alike; the model's batch-norm layers must have ``track_running_stats=False``. Their
scale and shift are meta-learned but not adapted in the inner loop (``adapt_norm=True`` adapts them
too). ``batch_norm="inductive"`` is the alternative: the layers keep running statistics over every
meta-training pass (support and query), and in ``eval()`` mode every example is normalised with those,
independently of the other examples of its task.

Tasks of a meta-batch run in a Python loop (``tasks="loop"``) or batched with ``torch.vmap``
(``tasks="vmap"``). ``"auto"`` picks, as measured on CPU (one thread, 5-way 1-shot, meta-batch 32):
the loop for models with convolutions (as fast as vmap with the strided Conv4, 1.7x faster with the
max-pooled one, and 4-20x less memory), vmap for the others (5x faster on the sinusoid MLP), and vmap
on GPUs, where one batched kernel replaces B small ones (not measured yet). The vmap path
normalises with batch statistics computed by plain tensor operations (:class:`PlainBatchNorm`): on
torch 2.13, vmap through
``F.batch_norm`` gives a wrong second-order meta-gradient when the norm layers' scale and shift are
batched, i.e. adapted per task (relative error ~1e-3 in float64; functorch#534). A test checks that
both paths give the same meta-gradient on the Conv4 with batch norm, adapted norm layers or not.
The loop path back-propagates each task's query loss as soon as it is computed (``per_task_backward``)
so that only one task's graph is alive at a time: peak memory does not grow with the meta-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from metashot.data.fewshot import Episode
from metashot.methods.base import Method, TaskInfo
from metashot.nn.backbones import MLP, Conv4

Params = dict[str, torch.Tensor]
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _plain_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm`` from plain tensor operations (input [N, C, *]), without running-stat updates."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if training or running_mean is None or running_var is None:
        dims = [0, *range(2, input.dim())]
        mean = input.mean(dims, keepdim=True)
        centred = input - mean
        var = centred.square().mean(dims, keepdim=True)
        out = centred * torch.rsqrt(var + eps)
    else:
        out = (input - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class PlainBatchNorm(TorchFunctionMode):
    """Within this mode ``F.batch_norm`` runs as :func:`_plain_batch_norm`.

    vmap's batching rule of the fused batch-norm kernel gives wrong second derivatives on torch 2.13;
    plain operations batch exactly. Running statistics are not updated inside the mode.
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _plain_batch_norm(*args, **kwargs)
        return func(*args, **kwargs)


def split_params(model: nn.Module, adapt_norm: bool = False) -> tuple[list[str], list[str]]:
    """Names of the parameters the inner loop adapts, and of those it keeps (normalisation layers')."""
    frozen = set()
    if not adapt_norm:
        for prefix, m in model.named_modules():
            if isinstance(m, NORM_LAYERS):
                frozen.update(f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters(recurse=False))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [n for n in names if n not in frozen], [n for n in names if n in frozen]


class MAML(Method):
    """MAML for classification: cross-entropy, accuracy.

    model: [M, *input_shape] -> logits [M, ways]. inner_lr: alpha; inner_steps: inner steps in
    training; test_inner_steps: in ``evaluate`` (default inner_steps); first_order: FOMAML;
    batch_norm: "transductive" (batch statistics, the paper's) or "inductive" (running statistics);
    adapt_norm: also adapt normalisation layers' scale and shift; tasks: "loop", "vmap" or "auto"
    (the loop for conv models on CPU, else vmap); per_task_backward: in the loop, back-propagate each
    task as soon as its query loss is known (one task's graph in memory at a time; the returned loss
    then carries gradients to the model's parameters only).

    ``loss(batch)`` adapts with ``inner_steps`` and reports the query metrics after adaptation;
    ``evaluate(batch)`` adapts with ``test_inner_steps`` and reports them after every step 0..N
    ("acc_step0" is before adaptation; "acc" is after the last step).
    """

    metric: ClassVar[str] = "acc"
    maximize: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        test_inner_steps: int | None = None,
        first_order: bool = False,
        batch_norm: str = "transductive",
        adapt_norm: bool = False,
        tasks: str = "auto",
        per_task_backward: bool = True,
    ) -> None:
        super().__init__()
        if inner_steps < 0 or (test_inner_steps is not None and test_inner_steps < 0):
            raise ValueError("inner step counts must be >= 0")
        if batch_norm not in ("transductive", "inductive"):
            raise ValueError(f"batch_norm must be 'transductive' or 'inductive', got {batch_norm!r}")
        if tasks not in ("auto", "loop", "vmap"):
            raise ValueError(f"tasks must be 'auto', 'loop' or 'vmap', got {tasks!r}")
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batch_norm == "transductive" and any(m.track_running_stats for m in bns):
            raise ValueError(
                "batch_norm='transductive' normalises with each batch's statistics: build the model's "
                "batch-norm layers with track_running_stats=False, or pass batch_norm='inductive'"
            )
        if batch_norm == "inductive":
            if not all(m.track_running_stats for m in bns):
                raise ValueError(
                    "batch_norm='inductive' needs batch-norm layers with track_running_stats=True"
                )
            if tasks == "vmap" and bns:
                raise ValueError("batch_norm='inductive' updates running statistics: use tasks='loop'")
        self.model = model
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        self.first_order = first_order
        self.batch_norm = batch_norm
        self.tasks = "loop" if batch_norm == "inductive" and bns else tasks
        self.per_task_backward = per_task_backward
        self.adapted, self.kept = split_params(model, adapt_norm)
        self._has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())

    # -- the task loss and metrics: override both for another kind of task ----------------------
    def task_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of one task: logits [M, ways], labels [M]."""
        return F.cross_entropy(pred, target)

    def task_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-task metrics [B] from predictions [B, M, ...] and targets [B, M, ...]."""
        loss = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none")
        return {
            "acc": (pred.argmax(-1) == target).float().mean(1),
            "loss": loss.view(target.shape).mean(1),
        }

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        info: TaskInfo,
        inner_lr: float | None = None,
        hidden: int | None = None,
        **kwargs: Any,
    ) -> Method:
        """The paper's networks: for images, Conv4 with stride-2 convolutions (no max-pooling),
        batch norm, global average pooling and a linear layer to ``ways`` logits; for regression
        tasks an MLP 1-40-40-1 (``hidden`` sets the widths: 64 and 40 by default).
        """
        if info.train_ways != info.ways and not info.regression:
            raise ValueError(
                f"MAML's classifier has one output per class: train ways ({info.train_ways}) must "
                f"equal test ways ({info.ways})"
            )
        if info.regression:
            width = hidden or 40
            dim = math.prod(info.input_shape)
            return MAMLRegression(
                MLP([dim, width, width, info.ways]), 0.01 if inner_lr is None else inner_lr, **kwargs
            )
        width = hidden or 64
        inductive = kwargs.get("batch_norm", "transductive") == "inductive"
        conv = Conv4(info.input_shape[0], width, width, strided=True, track_running_stats=inductive)
        model = nn.Sequential(
            *list(conv)[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, info.ways)
        )
        return cls(model, 0.4 if inner_lr is None else inner_lr, **kwargs)

    # -- the functional core ------------------------------------------------------------------
    def params(self) -> Params:
        return dict(self.model.named_parameters())

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The model at ``params`` (names as in ``model.named_parameters()``): x [M, ...] -> [M, ...]."""
        return functional_call(self.model, params, (x,))

    def adapt(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, create_graph: bool,
        callback: Callable[[int, Params], None] | None = None,
    ) -> Params:
        """Inner loop on one task (support x [M, ...], y [M, ...]) by ``torch.autograd.grad``.

        Returns the parameters after ``steps`` steps (the kept ones unchanged). With ``create_graph``
        the result is differentiable to second order in ``params``; without, only through the identity
        term (first order). ``callback(step, params)`` sees the parameters at every step 0..steps.
        """
        params = dict(params)
        for step in range(steps):
            if callback is not None:
                callback(step, params)
            loss = self.task_loss(self.forward(params, x), y)
            fast = [params[n] for n in self.adapted]
            grads = torch.autograd.grad(loss, fast, create_graph=create_graph, materialize_grads=True)
            params.update({n: w - self.inner_lr * g for n, w, g in zip(self.adapted, fast, grads)})
        if callback is not None:
            callback(steps, params)
        return params

    def _vmap_adapt(
        self, params: Params, batch: Episode, steps: int, first_order: bool, every_step: bool
    ) -> torch.Tensor:
        """Query predictions of every task, batched by ``torch.vmap``: [B, Q, ...], or with
        ``every_step`` [B, steps + 1, Q, ...] (before adaptation, after step 1, ...)."""
        kept = {n: params[n] for n in self.kept}

        def support_loss(fast: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.task_loss(self.forward({**kept, **fast}, x), y)

        def task(fast: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
            outs = []
            for _ in range(steps):
                if every_step:
                    outs.append(self.forward({**kept, **fast}, xq))
                grads = torch.func.grad(support_loss)(fast, xs, ys)
                if first_order:
                    grads = {n: g.detach() for n, g in grads.items()}
                fast = {n: fast[n] - self.inner_lr * grads[n] for n in fast}
            outs.append(self.forward({**kept, **fast}, xq))
            return torch.stack(outs) if every_step else outs[0]

        fast0 = {n: params[n] for n in self.adapted}
        with PlainBatchNorm():
            out = torch.vmap(task, in_dims=(None, 0, 0, 0))(fast0, batch.support, batch.support_labels,
                                                             batch.query)
        return out

    def _use_vmap(self, batch: Episode) -> bool:
        if self.tasks == "auto":  # see the module docstring for the measurements behind this rule
            return batch.support.device.type != "cpu" or not self._has_conv
        return self.tasks == "vmap"

    # -- the Method interface -----------------------------------------------------------------
    def loss(self, batch: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean query loss after ``inner_steps`` inner steps, and per-task query metrics [B].

        batch: support [B, S, ...], support_labels [B, S, ...], query [B, Q, ...], query_labels
        [B, Q, ...].
        """
        params = self.params()
        b = batch.support.shape[0]
        if self._use_vmap(batch):
            pred = self._vmap_adapt(params, batch, self.inner_steps, self.first_order, every_step=False)
            losses = torch.vmap(self.task_loss)(pred, batch.query_labels)
            return losses.mean(), self.task_metrics(pred.detach(), batch.query_labels)
        preds, total = [], None
        grads: list[torch.Tensor] | None = None
        grad_on = torch.is_grad_enabled()
        eager = self.per_task_backward and grad_on
        names = [n for n, p in params.items() if p.requires_grad]
        for i in range(b):
            with torch.enable_grad():  # the inner loop needs gradients even under no_grad
                fast = self.adapt(params, batch.support[i], batch.support_labels[i], self.inner_steps,
                                  create_graph=not self.first_order and grad_on)
            pred = self.forward(fast, batch.query[i])
            loss = self.task_loss(pred, batch.query_labels[i]) / b
            if eager:
                g = torch.autograd.grad(loss, [params[n] for n in names], materialize_grads=True)
                grads = list(g) if grads is None else [a.add_(c) for a, c in zip(grads, g)]
                loss = loss.detach()
            total = loss if total is None else total + loss
            preds.append(pred.detach())
        assert total is not None
        if eager and grads is not None:
            # value: the mean query loss; gradient to each parameter: the accumulated meta-gradient
            surrogate = sum((params[n] * g).sum() for n, g in zip(names, grads))
            total = total + surrogate - surrogate.detach()
        return total, self.task_metrics(torch.stack(preds), batch.query_labels)

    def evaluate(self, batch: Episode) -> dict[str, torch.Tensor]:
        """Per-task query metrics [B] before adaptation and after each of ``test_inner_steps`` steps."""
        steps = self.test_inner_steps
        params = {n: p.detach().requires_grad_(n in self.adapted) for n, p in self.params().items()}
        if self._use_vmap(batch):
            with torch.no_grad():
                preds = self._vmap_adapt(params, batch, steps, True, every_step=True)  # [B, steps+1, Q, ..]
        else:
            per_task = []
            for i in range(batch.support.shape[0]):
                outs: list[torch.Tensor] = []

                def record(step: int, p: Params, xq: torch.Tensor = batch.query[i],
                           outs: list[torch.Tensor] = outs) -> None:
                    with torch.no_grad():
                        outs.append(self.forward(p, xq))

                with torch.enable_grad():
                    self.adapt(params, batch.support[i], batch.support_labels[i], steps, False, record)
                per_task.append(torch.stack(outs))
            preds = torch.stack(per_task)
        per_step = [self.task_metrics(preds[:, s], batch.query_labels) for s in range(steps + 1)]
        out = dict(per_step[-1])
        for s, metrics in enumerate(per_step):
            out[f"{self.metric}_step{s}"] = metrics[self.metric]
        return {self.metric: out.pop(self.metric), **out}


class MAMLRegression(MAML):
    """MAML for regression: mean squared error, reported as "mse" (lower is better).

    model: [M, *input_shape] -> [M, *target_shape]; inner_lr defaults to the sinusoid's 0.01.
    """

    metric: ClassVar[str] = "mse"
    maximize: ClassVar[bool] = False

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, **kwargs: Any) -> None:
        super().__init__(model, inner_lr, **kwargs)

    def task_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target)

    def task_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": (pred - target).square().flatten(1).mean(1)}


__all__ = ["MAML", "MAMLRegression", "PlainBatchNorm", "split_params"]
