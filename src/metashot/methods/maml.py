"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), on ``torch.func``.

Inner loop (:meth:`MAML.adapt`, one step of it :meth:`MAML._inner_step`): for every task T_i of a
meta-batch, the parameters theta are adapted on the support set (the paper's eq. 1, repeated
``inner_steps`` times):

    theta_i' = theta - alpha * grad_theta L_{T_i}^{support}(f_theta)

Outer loop (eq. 3, the gradient of the meta-objective of eq. 2; Algorithm 2): :meth:`MAML.loss` returns
the meta-objective, differentiable through the inner steps, and the trainer's optimizer (the presets:
Adam, as the paper) takes the step

    theta <- theta - beta * grad_theta sum_i L_{T_i}^{query}(f_{theta_i'})

with the mean (not the sum) of the query losses over the meta-batch, as the authors' code does. The
meta-gradient of one task is (I - alpha * H_support(theta)) grad L^query(theta_i') for one step: second
order. ``first_order=True`` (FOMAML) drops the Hessian terms, using grad L^query(theta_i') itself.

The model is any ``nn.Module``; it is called through ``torch.func.functional_call`` with the adapted
parameters, so nothing is deep-copied and no module is patched.

Batch norm: ``batch_norm="transductive"`` (the paper's, the default) normalises every forward pass with
its own batch's statistics, support and query separately, at meta-training and meta-test alike;
``"inductive"`` keeps running statistics over every meta-training pass and normalises with those in
``eval()`` mode (:mod:`metashot.methods.batchnorm`). The layers' scale and shift are meta-learned, and
adapted in the inner loop only with ``adapt_norm=True``.

Tasks of a meta-batch run in a Python loop (``tasks="loop"``) or batched with ``torch.vmap``
(``tasks="vmap"``), both through the same inner step. ``"auto"`` is a fixed rule, never a timing, so that
a config and seed give the same run on any load: vmap for models without convolutions, on accelerators,
and for tasks of at most :data:`VMAP_MAX_EXAMPLES` support and query examples; the loop otherwise. When
the inner loop adapts batch-norm scales and shifts, the vmap path normalises with plain tensor operations
(:mod:`metashot.methods.batchnorm`), which vmap differentiates exactly. The loop path back-propagates
each task's query loss as soon as it is computed (``per_task_backward``, :meth:`MAML._meta_objective`)
so that only one task's graph is alive at a time: peak memory does not grow with the meta-batch.

Variants, each a constructor argument and a ``method_args`` key, all off by default (off, the code path
is the plain MAML above), each described with its pieces: MAML++ (``msl_steps``, ``first_order_steps``,
``per_step_bn``, ``learned_lr="lslr"``), Meta-SGD (``learned_lr="metasgd"``) and memory-efficient MAML
(``recompute=True``) in :mod:`metashot.methods.inner_loop`; ANIL (``inner_params="head"``) in
:mod:`metashot.methods.inner_params`.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metashot.batches import Episode, TaskInfo
from metashot.methods.base import Method
from metashot.methods.batchnorm import PlainBatchNorm, batch_norm_layers, batch_statistics
from metashot.methods.inner_loop import PerStepBatchNorm, learned_rates, msl_weights, recomputed_step
from metashot.methods.inner_params import adapts_batch_norm, split_params
from metashot.methods.maml_args import check_batch_norm, check_options, renamed_args
from metashot.nn.backbones import feature_size

Params = dict[str, torch.Tensor]
# tasks="auto" batches tasks of up to this many support + query examples with vmap on a CPU: per-task
# overhead dominates small tasks, and vmap's memory grows with the meta-batch
VMAP_MAX_EXAMPLES = 20


class MAML(Method):
    """MAML for classification: cross-entropy, accuracy.

    model: [M, *input_shape] -> logits [M, ways]. inner_lr: alpha; inner_steps: inner steps in
    training; test_inner_steps: in ``evaluate`` (default inner_steps); first_order: FOMAML;
    batch_norm: "transductive" (batch statistics, the paper's) or "inductive" (running statistics);
    adapt_norm: also adapt normalisation layers' scale and shift; tasks: "loop", "vmap" or "auto"
    (a rule by model, device and task size: module docstring); per_task_backward: in the loop,
    back-propagate each task as soon as its query loss is known (one task's graph in memory at a time;
    the returned loss then carries gradients to the method's parameters only).

    The variants (:mod:`~metashot.methods.inner_loop`): inner_params: "all", "head" (ANIL) or name
    prefixes; learned_lr: "none", "lslr" (MAML++) or "metasgd"; per_step_bn, msl_steps,
    first_order_steps: MAML++; recompute: recompute second-order inner steps in the backward pass.
    Schedules count the optimizer steps given to ``on_step``: a training loop of one's own must call it
    before each step.

    ``loss(batch)`` adapts with ``inner_steps`` and reports the query metrics after adaptation;
    ``evaluate(batch)`` adapts with ``test_inner_steps`` and reports them after every step 0..N
    ("acc_step0" is before adaptation; "acc" is after the last step).
    """

    metric: ClassVar[str] = "acc"
    maximize: ClassVar[bool] = True
    default_backbone: ClassVar[str | None] = "conv4-strided"

    def __init__(
        self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1,
        test_inner_steps: int | None = None, first_order: bool = False, batch_norm: str = "transductive",
        adapt_norm: bool = False, tasks: str = "auto", per_task_backward: bool = True,
        inner_params: str | Sequence[str] = "all", learned_lr: str = "none", per_step_bn: bool = False,
        msl_steps: int = 0, first_order_steps: int = 0, recompute: bool = False,
    ) -> None:
        super().__init__()
        check_options(inner_steps, test_inner_steps, batch_norm, tasks, learned_lr, msl_steps,
                       first_order_steps, recompute)
        bns = batch_norm_layers(model)
        check_batch_norm(bns, batch_norm, tasks, per_step_bn)
        self.model = model
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        self.first_order = first_order
        self.batch_norm = batch_norm
        self.tasks = "loop" if (batch_norm == "inductive" and bns) or recompute else tasks
        self.per_task_backward = per_task_backward
        self.adapted, self.kept = split_params(model, adapt_norm, inner_params)
        self._has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        # vmap batches the fused batch norm exactly unless its scale and shift differ per task
        self._plain_norm = adapts_batch_norm(model, self.adapted)
        self.learned_lr = learned_lr
        self.msl_steps = msl_steps
        self.first_order_steps = first_order_steps
        self.recompute = recompute
        self.train_step = 0  # the optimizer step, from on_step
        self._per_step_tensors(per_step_bn)

    def _per_step_tensors(self, per_step_bn: bool) -> None:
        """MAML++'s per-step batch norm and the learned rates (LSLR, Meta-SGD), with a set for every
        inner step of training and test."""
        self.step_sets = max(self.inner_steps, self.test_inner_steps, 1)
        self.step_norm = PerStepBatchNorm(self.model, self.step_sets) if per_step_bn else None
        replaced = self.step_norm.replaced() if self.step_norm is not None else []
        if set(replaced) & set(self.adapted):
            raise ValueError(
                "per_step_bn replaces the batch-norm scales and shifts by per-step ones, which the inner "
                "loop does not adapt: leave them out (adapt_norm=False, inner_params)"
            )
        self._replaced = {f"model.{n}" for n in replaced}
        self.inner_lrs = learned_rates(self.model, self.adapted, self.learned_lr, self.step_sets,
                                       self.inner_lr)

    # -- the task loss and metrics: override both for another kind of task ----------------------
    def task_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of one task: logits [M, ways], labels [M]."""
        return F.cross_entropy(pred, target)

    def task_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-task metrics [B] from predictions [B, M, ...] and targets [B, M, ...]."""
        loss = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none")
        return {"acc": (pred.argmax(-1) == target).float().mean(1), "loss": loss.view(target.shape).mean(1)}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls, info: TaskInfo, backbone: str | None = None, backbone_args: dict[str, Any] | None = None,
        hidden: int | None = None, checkpoint: bool | None = None, **kwargs: Any,
    ) -> Method:
        """The backbone, then a linear layer to ``ways`` outputs. By default the paper's networks: for
        images the strided Conv4 with global average pooling (64 wide), for regression tasks
        (:class:`MAMLRegression`) the MLP 1-40-40. With the default ``batch_norm="transductive"`` the
        backbone's batch-norm layers use batch statistics. Deprecated, still read: ``hidden`` (the
        backbone's width: ``backbone_args={"hidden": ...}``) and ``checkpoint`` (``recompute``)."""
        if info.train_ways != info.ways and not info.regression:
            raise ValueError(
                f"MAML's classifier has one output per class: train ways ({info.train_ways}) must "
                f"equal test ways ({info.ways})"
            )
        renamed_args(kwargs, hidden, checkpoint)
        kind = MAMLRegression if info.regression else cls
        body = kind.build_backbone(info, backbone, backbone_args, hidden=hidden)
        if kwargs.get("batch_norm", "transductive") == "transductive":
            batch_statistics(body)
        head = nn.Linear(feature_size(body, info.input_shape), info.ways)
        # a plain Sequential body is spliced in, so the paper networks' parameter names stay those of
        # the runs saved before backbones were separate (model.0.0.weight, ..., model.6.weight)
        plain = isinstance(body, nn.Sequential) and type(body).forward is nn.Sequential.forward
        return kind(nn.Sequential(*(body if plain else [body]), head), **kwargs)

    # -- schedules ------------------------------------------------------------------------------
    def on_step(self, step: int) -> None:
        self.train_step = step

    def autocast_safe(self) -> bool:
        """First order (``first_order``) only: a second-order step (MAML++'s annealing included) keeps the
        whole run in float32 under ``--precision bf16``. Tasks batched by ``tasks="vmap"`` stay float32 too
        (torch 2.13's vmap of batch norm's backward fails under autocast: "expected scalar type BFloat16");
        ``tasks="auto"`` loops over them under autocast."""
        return self.first_order and self.tasks != "vmap"

    def meta_parameters(self) -> list[nn.Parameter]:
        """The parameters the meta-loss depends on: all but the model's batch-norm scales and shifts
        when per-step ones replace them."""
        return [p for n, p in self.named_parameters() if p.requires_grad and n not in self._replaced]

    # -- the inner loop -----------------------------------------------------------------------
    def params(self) -> Params:
        return dict(self.model.named_parameters())

    def forward(self, params: Params, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """The model at ``params`` (names as in ``model.named_parameters()``): x [M, ...] -> [M, ...];
        with ``per_step_bn``, batch norm uses inner step ``step``'s set."""
        return functional_call(self.model, {**params, **self._norm(step)}, (x,))

    def _norm(self, step: int) -> Params:
        return self.step_norm.at(step) if self.step_norm is not None else {}

    def _lrs(self, step: int) -> list[Any]:
        """Inner step ``step``'s learning rate for each adapted tensor: alpha (a float), LSLR's
        alpha_{l,step} (a scalar tensor) or Meta-SGD's alpha_l (of the parameter's shape)."""
        if self.inner_lrs is None:
            return [self.inner_lr] * len(self.adapted)
        if self.learned_lr == "lslr":
            k = min(step, self.step_sets - 1)
            return [lr[k] for lr in self.inner_lrs]
        return list(self.inner_lrs)

    def _inner_step(
        self, x: torch.Tensor, y: torch.Tensor, params: Params, norm: Params, lrs: list[Any],
        create_graph: bool, vmapped: bool = False,
    ) -> Params:
        """The adapted tensors after one gradient step on the support loss (x [M, ...], y [M, ...]) at
        ``params``, batch-norm tensors ``norm`` substituted: theta_{k+1} = theta_k - alpha_k * g_k with
        the step sizes ``lrs``. The loop and vmap paths share it; only the gradient g_k differs: by
        ``torch.autograd.grad`` (with ``create_graph``, differentiable to second order) or, inside
        ``torch.vmap`` (``vmapped``), by ``torch.func.grad`` (detached without ``create_graph``)."""
        fast = [params[n] for n in self.adapted]
        # the loop differentiates even under no_grad; torch.func.grad does so in any grad mode
        with contextlib.nullcontext() if vmapped else torch.enable_grad():
            if vmapped:
                def support_loss(f: Params) -> torch.Tensor:
                    return self.task_loss(functional_call(self.model, {**params, **f, **norm}, (x,)), y)

                g = torch.func.grad(support_loss)(dict(zip(self.adapted, fast)))
                grads = [g[n] if create_graph else g[n].detach() for n in self.adapted]
            else:
                loss = self.task_loss(functional_call(self.model, {**params, **norm}, (x,)), y)
                grads = torch.autograd.grad(loss, fast, create_graph=create_graph, materialize_grads=True)
            return {n: w - lr * g for n, w, g, lr in zip(self.adapted, fast, grads, lrs)}

    def adapt(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, create_graph: bool,
        callback: Callable[[int, Params], None] | None = None, vmapped: bool = False,
    ) -> Params:
        """Inner loop on one task (support x [M, ...], y [M, ...]): ``steps`` inner steps.

        Returns the parameters after them (the kept ones unchanged). With ``create_graph`` the result
        is differentiable to second order in ``params``; without, only through the identity term (first
        order). ``callback(step, params)`` sees the parameters at every step 0..steps. ``vmapped``: the
        call is inside ``torch.vmap``.
        """
        params = dict(params)
        for step in range(steps):
            if callback is not None:
                callback(step, params)
            norm, lrs = self._norm(step), self._lrs(step)
            if self.recompute and create_graph and not vmapped:
                step_fn = functools.partial(self._inner_step, x, y)
                params.update(recomputed_step(step_fn, self.adapted, params, norm, lrs, list(self.buffers())))
            else:
                params.update(self._inner_step(x, y, params, norm, lrs, create_graph, vmapped))
        if callback is not None:
            callback(steps, params)
        return params

    def _adapted_predictions(
        self, params: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, steps: int,
        create_graph: bool, record_from: int | None = None, vmapped: bool = False,
    ) -> list[torch.Tensor]:
        """:meth:`adapt` on one task's support set (xs, ys), and the query predictions [Q, ...] at
        theta_k for k = ``record_from``..``steps`` (None: at theta_steps only)."""
        first = steps if record_from is None else record_from
        outs: list[torch.Tensor] = []

        def record(step: int, p: Params) -> None:
            if step >= first:  # after inner step k the query pass uses step k's batch-norm set
                outs.append(self.forward(p, xq, max(step - 1, 0)))

        self.adapt(params, xs, ys, steps, create_graph, record, vmapped)
        return outs

    def _use_vmap(self, batch: Episode) -> bool:
        if self.tasks != "auto":
            return self.tasks == "vmap"
        if torch.is_autocast_enabled(batch.support.device.type):
            return False  # see autocast_safe
        examples = batch.support.shape[1] + batch.query.shape[1]
        return batch.support.device.type != "cpu" or not self._has_conv or examples <= VMAP_MAX_EXAMPLES

    def _vmapped(self, task: Callable[..., Any], batch: Episode) -> Any:
        """``task(support, support_labels, query, query_labels, vmapped=True)`` of every task of the
        batch at once, by ``torch.vmap``: its outputs with a leading [B]."""
        # randomness: each task draws its own dropout (DropBlock) masks
        with PlainBatchNorm() if self._plain_norm else contextlib.nullcontext():
            return torch.vmap(functools.partial(task, vmapped=True), randomness="different")(
                batch.support, batch.support_labels, batch.query, batch.query_labels)

    # -- the meta-objective -------------------------------------------------------------------
    def _query_loss(
        self, preds: list[torch.Tensor], y: torch.Tensor, weights: list[float] | None
    ) -> torch.Tensor:
        """One task's query loss L^query(theta_S) from its predictions after the last step; with MSL
        ``weights`` v, sum_k v_k L^query(theta_k) from those after steps 1..S."""
        loss = self.task_loss(preds[-1], y)
        if weights is None:
            return loss
        return weights[-1] * loss + sum(w * self.task_loss(p, y) for w, p in zip(weights, preds[:-1]))

    def _meta_objective(self, task_losses: Iterable[torch.Tensor]) -> torch.Tensor:
        """sum_i L_i over the tasks' query losses (each already divided by B), taken as the loop yields
        them; with ``per_task_backward`` (and gradients on), each is back-propagated on arrival."""
        if not (self.per_task_backward and torch.is_grad_enabled()):
            return functools.reduce(operator.add, task_losses)
        leaves = self.meta_parameters()
        total = grads = None
        for loss in task_losses:
            g = torch.autograd.grad(loss, leaves, materialize_grads=True)  # frees this task's graph
            grads = list(g) if grads is None else [a.add_(c) for a, c in zip(grads, g)]
            total = loss.detach() if total is None else total + loss.detach()
        assert total is not None and grads is not None
        # the surrogate: its value is the mean query loss (the added terms cancel), its gradient to each
        # meta-parameter p is the accumulated meta-gradient g_p = sum_i dL_i/dp (d/dp of p . g_p)
        surrogate = sum((p * g).sum() for p, g in zip(leaves, grads))
        return total + surrogate - surrogate.detach()

    # -- the Method interface -----------------------------------------------------------------
    def loss(self, batch: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean query loss after ``inner_steps`` inner steps (with ``msl_steps``, the weighted sum over
        the steps), and per-task query metrics [B] after the last step.

        batch: support [B, S, ...], support_labels [B, S, ...], query [B, Q, ...], query_labels
        [B, Q, ...].
        """
        params, steps = self.params(), self.inner_steps
        weights = msl_weights(self.train_step, steps, self.msl_steps)
        first_order = self.first_order or self.train_step < self.first_order_steps
        create_graph = not first_order and torch.is_grad_enabled()

        def task(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor,
                 vmapped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
            """Inner half: adapt to one task; its query loss at theta_i' and its query predictions."""
            record_from = None if weights is None else 1
            preds = self._adapted_predictions(params, xs, ys, xq, steps, create_graph, record_from, vmapped)
            return self._query_loss(preds, yq, weights), preds[-1]

        # outer half: the meta-objective, the mean of the tasks' query losses
        if self._use_vmap(batch):
            losses, pred = self._vmapped(task, batch)
            return losses.mean(), self.task_metrics(pred.detach(), batch.query_labels)
        b, preds = batch.support.shape[0], list[torch.Tensor]()

        def task_losses() -> Iterator[torch.Tensor]:
            for xs, ys, xq, yq in zip(batch.support, batch.support_labels, batch.query, batch.query_labels):
                loss, pred = task(xs, ys, xq, yq)
                preds.append(pred.detach())
                yield loss / b

        total = self._meta_objective(task_losses())
        return total, self.task_metrics(torch.stack(preds), batch.query_labels)

    def step_predictions(self, batch: Episode, steps: int | None = None) -> torch.Tensor:
        """Query predictions before adaptation and after each of ``steps`` (default
        ``test_inner_steps``) inner steps, without meta-gradients: [B, steps + 1, Q, ...]."""
        steps = self.test_inner_steps if steps is None else steps
        params = {n: p.detach().requires_grad_(n in self.adapted) for n, p in self.params().items()}

        def task(xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor,
                 vmapped: bool = False) -> torch.Tensor:
            return torch.stack(self._adapted_predictions(params, xs, ys, xq, steps, False, 0, vmapped))

        with torch.no_grad():
            if self._use_vmap(batch):
                return self._vmapped(task, batch)
            tasks = zip(batch.support, batch.support_labels, batch.query, batch.query_labels)
            return torch.stack([task(*t) for t in tasks])

    def evaluate(self, batch: Episode) -> dict[str, torch.Tensor]:
        """Per-task query metrics [B] before adaptation and after each of ``test_inner_steps`` steps."""
        preds = self.step_predictions(batch)
        per_step = [self.task_metrics(preds[:, s], batch.query_labels) for s in range(preds.shape[1])]
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
    default_backbone: ClassVar[str | None] = "mlp"

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, **kwargs: Any) -> None:
        super().__init__(model, inner_lr, **kwargs)

    def task_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target)

    def task_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": (pred - target).square().flatten(1).mean(1)}


__all__ = ["MAML", "MAMLRegression", "VMAP_MAX_EXAMPLES"]
