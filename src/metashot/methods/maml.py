"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), on ``torch.func``.

For every task T_i of a meta-batch the inner loop adapts the parameters theta on the support set
(the paper's eq. 1, repeated ``inner_steps`` times):

    theta_i' = theta - alpha * grad_theta L_{T_i}^{support}(f_theta)

and the outer loop (eq. 3, the gradient of the meta-objective of eq. 2; Algorithm 2) updates theta
with the gradient of the query losses at the adapted parameters, taken through the inner steps:

    theta <- theta - beta * grad_theta sum_i L_{T_i}^{query}(f_{theta_i'})

The meta-gradient of one task is (I - alpha * H_support(theta)) grad L^query(theta_i') for one step:
second order. ``first_order=True`` (FOMAML) drops the Hessian terms, using grad L^query(theta_i')
itself. The outer step is the trainer's optimizer (the presets: Adam, as the paper); ``loss`` returns
the mean (not the sum) of the query losses over the meta-batch, as the authors' code does.

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
(``tasks="vmap"``). ``"auto"`` is a fixed rule, never a timing, so that a config and seed give the same
run on any load: vmap for models without convolutions, on accelerators, and for tasks of at most
:data:`VMAP_MAX_EXAMPLES` support and query examples; the loop otherwise. When the inner loop adapts
batch-norm scales and shifts (``adapt_norm``), the vmap path normalises with batch statistics computed by
plain tensor operations (:class:`PlainBatchNorm`): vmap through ``F.batch_norm`` gives a wrong
second-order meta-gradient when the norm layers' scale and shift are batched, i.e. differ per task
(functorch#534). Shared by all tasks, they go through the fused kernel, which vmap batches exactly and
faster. A test checks that both paths give the same meta-gradient.
The loop path back-propagates each task's query loss as soon as it is computed (``per_task_backward``)
so that only one task's graph is alive at a time: peak memory does not grow with the meta-batch.

Variants, each a constructor argument and a ``method_args`` key, all off by default (off, the code path
is the plain MAML above):

- MAML++ (Antoniou, Edwards & Storkey, ICLR 2019, "How to train your MAML", section 4).
  ``msl_steps``: multi-step loss, L = sum_{i=1..S} v_i L^query(theta_i) over the S inner steps, the
  weights v annealed from uniform toward the last step over the first ``msl_steps`` optimizer steps,
  then the last step's loss alone (:func:`~metashot.methods.inner_loop.msl_weights`).
  ``first_order_steps``: derivative-order annealing, first order while the optimizer step (given by
  ``on_step``) is below it, second order from it on.
  ``per_step_bn``: per-step batch norm, a scale and shift (BNWB) and, with ``batch_norm="inductive"``,
  running statistics (BNRS) per inner step for every batch-norm layer of the model, substituted through
  ``functional_call`` (:class:`~metashot.methods.inner_loop.PerStepBatchNorm`). As in the authors' code,
  inner step k's support pass (at theta_k) and the query pass after it (at theta_{k+1}) use set k; the
  query before adaptation uses set 0.
  ``learned_lr="lslr"``: learned per-layer per-step learning rates, theta_{k+1} = theta_k - alpha_{l,k}
  grad_l L^support(theta_k), one alpha per parameter tensor l and inner step k, initialised to
  ``inner_lr`` and meta-learned.
  The cosine annealing of the outer learning rate is the trainer's (``Config.schedule="cosine"``).
- ANIL (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, section 4): ``inner_params="head"`` adapts only the
  last ``nn.Linear`` in the inner loop, theta_head' = theta_head - alpha grad_head L^support(theta_body,
  theta_head); the body gets only the outer gradient. A list of parameter-name prefixes selects others.
- Meta-SGD (Li, Zhou, Chen & Li 2017, section 3): ``learned_lr="metasgd"``, theta' = theta - alpha o
  grad L^support(theta) with alpha a meta-learned tensor of each parameter's shape (o: elementwise),
  initialised to ``inner_lr``.
- Memory-efficient MAML (gradient checkpointing, Chen et al. 2016, per inner step): ``checkpoint=True``
  keeps only each second-order inner step's input parameters and recomputes the step in the backward
  pass, so the memory of the activations no longer grows with the inner steps; the meta-gradient
  prod_k (I - alpha H_k) grad L^query(theta_S) is the same. It runs in the loop only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from metashot.batches import Episode, TaskInfo
from metashot.methods.base import Method
from metashot.methods.inner_loop import PerStepBatchNorm, msl_weights, recomputed
from metashot.nn.backbones import feature_size

Params = dict[str, torch.Tensor]
# tasks="auto" batches tasks of up to this many support + query examples with vmap on a CPU: per-task
# overhead dominates small tasks, and vmap's memory grows with the meta-batch
VMAP_MAX_EXAMPLES = 20
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


def batch_statistics(model: nn.Module) -> nn.Module:
    """``model`` with every batch-norm layer as if built with ``track_running_stats=False`` (normalising
    with each batch's statistics, no running statistics kept): transductive batch norm on any network."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def split_params(
    model: nn.Module, adapt_norm: bool = False, inner_params: str | Sequence[str] = "all"
) -> tuple[list[str], list[str]]:
    """Names of the parameters the inner loop adapts, and of those it keeps.

    inner_params: "all" (every parameter but the normalisation layers', unless ``adapt_norm``), "head"
    (the last ``nn.Linear``'s: ANIL) or a list of name prefixes (the parameters under them).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if inner_params == "all":
        frozen = set()
        if not adapt_norm:
            for prefix, m in model.named_modules():
                if isinstance(m, NORM_LAYERS):
                    own = m.named_parameters(recurse=False)
                    frozen.update(f"{prefix}.{n}" if prefix else n for n, _ in own)
        return [n for n in names if n not in frozen], [n for n in names if n in frozen]
    if inner_params == "head":
        heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not heads:
            raise ValueError("inner_params='head' adapts the model's last nn.Linear, and it has none")
        prefixes = heads[-1:]
    elif isinstance(inner_params, str):
        raise ValueError(f"inner_params must be 'all', 'head' or a list of prefixes, got {inner_params!r}")
    else:
        prefixes = list(inner_params)
    adapted = [n for n in names if any(_under(n, p) for p in prefixes)]
    if not adapted:
        raise ValueError(f"inner_params {inner_params!r} selects none of the model's parameters")
    return adapted, [n for n in names if n not in adapted]


def _query_set(steps_done: int) -> int:
    """The per-step batch-norm set of a query pass after ``steps_done`` inner steps: the last step's."""
    return max(steps_done - 1, 0)


class MAML(Method):
    """MAML for classification: cross-entropy, accuracy.

    model: [M, *input_shape] -> logits [M, ways]. inner_lr: alpha; inner_steps: inner steps in
    training; test_inner_steps: in ``evaluate`` (default inner_steps); first_order: FOMAML;
    batch_norm: "transductive" (batch statistics, the paper's) or "inductive" (running statistics);
    adapt_norm: also adapt normalisation layers' scale and shift; tasks: "loop", "vmap" or "auto"
    (a rule by model, device and task size: module docstring); per_task_backward: in the loop,
    back-propagate each task as soon as its query loss is known (one task's graph in memory at a time;
    the returned loss then carries gradients to the method's parameters only).

    The variants (module docstring): inner_params: "all", "head" (ANIL) or name prefixes;
    learned_lr: "none", "lslr" (MAML++) or "metasgd"; per_step_bn, msl_steps, first_order_steps:
    MAML++; checkpoint: recompute second-order inner steps in the backward pass. Schedules count the
    optimizer steps given to ``on_step``: a training loop of one's own must call it before each step.

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
        inner_params: str | Sequence[str] = "all",
        learned_lr: str = "none",
        per_step_bn: bool = False,
        msl_steps: int = 0,
        first_order_steps: int = 0,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if inner_steps < 0 or (test_inner_steps is not None and test_inner_steps < 0):
            raise ValueError("inner step counts must be >= 0")
        if batch_norm not in ("transductive", "inductive"):
            raise ValueError(f"batch_norm must be 'transductive' or 'inductive', got {batch_norm!r}")
        if tasks not in ("auto", "loop", "vmap"):
            raise ValueError(f"tasks must be 'auto', 'loop' or 'vmap', got {tasks!r}")
        if learned_lr not in ("none", "lslr", "metasgd"):
            raise ValueError(f"learned_lr must be 'none', 'lslr' or 'metasgd', got {learned_lr!r}")
        if msl_steps < 0 or first_order_steps < 0:
            raise ValueError("msl_steps and first_order_steps count optimizer steps: they must be >= 0")
        if msl_steps and inner_steps < 1:
            raise ValueError("msl_steps weighs the query loss after each inner step: needs inner_steps >= 1")
        if checkpoint and tasks == "vmap":
            raise ValueError(
                "checkpoint=True recomputes each inner step in a custom autograd function, which "
                "torch.vmap cannot batch: use tasks='loop'"
            )
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
        if per_step_bn and not bns:
            raise ValueError("per_step_bn=True needs batch-norm layers, and the model has none")
        self.model = model
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        self.first_order = first_order
        self.batch_norm = batch_norm
        self.tasks = "loop" if (batch_norm == "inductive" and bns) or checkpoint else tasks
        self.per_task_backward = per_task_backward
        self.adapted, self.kept = split_params(model, adapt_norm, inner_params)
        self._has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        # vmap batches the fused batch norm exactly unless its scale and shift differ per task
        self._plain_norm = any(
            _under(n, prefix) for prefix, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for n in self.adapted
        )
        self.learned_lr = learned_lr
        self.msl_steps = msl_steps
        self.first_order_steps = first_order_steps
        self.checkpoint = checkpoint
        self.train_step = 0  # the optimizer step, from on_step
        # per-step tensors (batch-norm sets, LSLR rates) for every step of training and test
        self.step_sets = max(inner_steps, self.test_inner_steps, 1)
        self.step_norm = PerStepBatchNorm(model, self.step_sets) if per_step_bn else None
        replaced = self.step_norm.replaced() if self.step_norm is not None else []
        if set(replaced) & set(self.adapted):
            raise ValueError(
                "per_step_bn replaces the batch-norm scales and shifts by per-step ones, which the inner "
                "loop does not adapt: leave them out (adapt_norm=False, inner_params)"
            )
        self._replaced = {f"model.{n}" for n in replaced}
        params = dict(model.named_parameters())
        self.inner_lrs: nn.ParameterList | None = None
        if learned_lr == "lslr":
            self.inner_lrs = nn.ParameterList(
                torch.full((self.step_sets,), inner_lr, dtype=params[n].dtype, device=params[n].device)
                for n in self.adapted
            )
        elif learned_lr == "metasgd":
            self.inner_lrs = nn.ParameterList(
                torch.full_like(params[n].detach(), inner_lr) for n in self.adapted
            )

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
    default_backbone: ClassVar[str | None] = "conv4-strided"

    @classmethod
    def build(
        cls,
        info: TaskInfo,
        backbone: str | None = None,
        backbone_args: dict[str, Any] | None = None,
        hidden: int | None = None,
        **kwargs: Any,
    ) -> Method:
        """The backbone, then a linear layer to ``ways`` outputs. By default the paper's networks: for
        images the strided Conv4 with global average pooling (64 wide), for regression tasks
        (:class:`MAMLRegression`) the MLP 1-40-40 (``hidden`` sets the width). With the default
        ``batch_norm="transductive"`` the backbone's batch-norm layers use batch statistics."""
        if info.train_ways != info.ways and not info.regression:
            raise ValueError(
                f"MAML's classifier has one output per class: train ways ({info.train_ways}) must "
                f"equal test ways ({info.ways})"
            )
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

    def meta_parameters(self) -> list[nn.Parameter]:
        """The parameters the meta-loss depends on: all but the model's batch-norm scales and shifts
        when per-step ones replace them."""
        return [p for n, p in self.named_parameters() if p.requires_grad and n not in self._replaced]

    # -- the functional core ------------------------------------------------------------------
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
        self, params: Params, norm: Params, lrs: list[Any], x: torch.Tensor, y: torch.Tensor,
        create_graph: bool,
    ) -> Params:
        """The adapted parameters after one gradient step on the support loss (x [M, ...], y [M, ...]) at
        ``params``, batch-norm tensors ``norm`` substituted, with step sizes ``lrs``."""
        loss = self.task_loss(functional_call(self.model, {**params, **norm}, (x,)), y)
        fast = [params[n] for n in self.adapted]
        grads = torch.autograd.grad(loss, fast, create_graph=create_graph, materialize_grads=True)
        return {n: w - lr * g for n, w, g, lr in zip(self.adapted, fast, grads, lrs)}

    def _checkpointed_step(
        self, params: Params, norm: Params, lrs: list[Any], x: torch.Tensor, y: torch.Tensor
    ) -> Params:
        """``_inner_step`` with a second-order graph rebuilt in the backward pass instead of kept."""
        names = [n for n, p in params.items() if p.requires_grad]
        keys = [k for k, t in norm.items() if t.requires_grad]
        rates = [i for i, lr in enumerate(lrs) if isinstance(lr, torch.Tensor)]

        def step(ts: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
            it = iter(ts)  # the tensors below, in their order
            p = {**params, **{n: next(it) for n in names}}
            nm = {**norm, **{k: next(it) for k in keys}}
            r = list(lrs)
            for i in rates:
                r[i] = next(it)
            return list(self._inner_step(p, nm, r, x, y, create_graph).values())

        inputs = [params[n] for n in names] + [norm[k] for k in keys] + [lrs[i] for i in rates]
        return dict(zip(self.adapted, recomputed(step, inputs, list(self.buffers()))))

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
            norm, lrs = self._norm(step), self._lrs(step)
            if self.checkpoint and create_graph:
                params.update(self._checkpointed_step(params, norm, lrs, x, y))
            else:
                params.update(self._inner_step(params, norm, lrs, x, y, create_graph))
        if callback is not None:
            callback(steps, params)
        return params

    def _vmap_adapt(
        self, params: Params, batch: Episode, steps: int, first_order: bool, record_from: int | None = None
    ) -> torch.Tensor:
        """Query predictions of every task, batched by ``torch.vmap``: after the last step [B, Q, ...],
        or with ``record_from`` j after steps j..steps [B, steps + 1 - j, Q, ...] (0: before adaptation)."""
        kept = {n: params[n] for n in self.kept}

        def support_loss(fast: Params, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
            return self.task_loss(self.forward({**kept, **fast}, x, step), y)

        def task(fast: Params, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
            outs = []
            for step in range(steps):
                if record_from is not None and step >= record_from:
                    outs.append(self.forward({**kept, **fast}, xq, _query_set(step)))
                grads = torch.func.grad(support_loss)(fast, xs, ys, step)
                if first_order:
                    grads = {n: g.detach() for n, g in grads.items()}
                fast = {n: fast[n] - lr * grads[n] for n, lr in zip(self.adapted, self._lrs(step))}
            outs.append(self.forward({**kept, **fast}, xq, _query_set(steps)))
            return torch.stack(outs) if record_from is not None else outs[0]

        fast0 = {n: params[n] for n in self.adapted}
        # randomness: each task draws its own dropout (DropBlock) masks
        with PlainBatchNorm() if self._plain_norm else contextlib.nullcontext():
            out = torch.vmap(task, in_dims=(None, 0, 0, 0), randomness="different")(
                fast0, batch.support, batch.support_labels, batch.query)
        return out

    def _use_vmap(self, batch: Episode) -> bool:
        if self.tasks != "auto":
            return self.tasks == "vmap"
        examples = batch.support.shape[1] + batch.query.shape[1]
        return batch.support.device.type != "cpu" or not self._has_conv or examples <= VMAP_MAX_EXAMPLES

    # -- the Method interface -----------------------------------------------------------------
    def loss(self, batch: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean query loss after ``inner_steps`` inner steps (with ``msl_steps``, the weighted sum over
        the steps), and per-task query metrics [B] after the last step.

        batch: support [B, S, ...], support_labels [B, S, ...], query [B, Q, ...], query_labels
        [B, Q, ...].
        """
        params = self.params()
        b = batch.support.shape[0]
        steps = self.inner_steps
        first_order = self.first_order or self.train_step < self.first_order_steps
        weights = msl_weights(self.train_step, steps, self.msl_steps)
        if self._use_vmap(batch):
            if weights is None:
                pred = self._vmap_adapt(params, batch, steps, first_order)
                losses = torch.vmap(self.task_loss)(pred, batch.query_labels)
            else:
                preds = self._vmap_adapt(params, batch, steps, first_order, record_from=1)  # [B, steps, Q..]
                step_loss = torch.vmap(torch.vmap(self.task_loss, in_dims=(0, None)))
                per_step = step_loss(preds, batch.query_labels)  # [B, steps]
                losses = per_step @ per_step.new_tensor(weights)
                pred = preds[:, -1]
            return losses.mean(), self.task_metrics(pred.detach(), batch.query_labels)
        preds, total = [], None
        grads: list[torch.Tensor] | None = None
        grad_on = torch.is_grad_enabled()
        eager = self.per_task_backward and grad_on
        leaves = self.meta_parameters() if eager else []
        for i in range(b):
            xq, yq = batch.query[i], batch.query_labels[i]
            step_losses: list[torch.Tensor] = []
            record = None
            if weights is not None:

                def record(step: int, p: Params, xq: torch.Tensor = xq, yq: torch.Tensor = yq,
                           out: list[torch.Tensor] = step_losses) -> None:
                    if 0 < step < steps:  # the last step's is the final loss below
                        out.append(self.task_loss(self.forward(p, xq, _query_set(step)), yq))

            with torch.enable_grad():  # the inner loop needs gradients even under no_grad
                fast = self.adapt(params, batch.support[i], batch.support_labels[i], steps,
                                  create_graph=not first_order and grad_on, callback=record)
            pred = self.forward(fast, xq, _query_set(steps))
            loss = self.task_loss(pred, yq)
            if weights is not None:
                loss = weights[-1] * loss + sum(w * q for w, q in zip(weights, step_losses))
            loss = loss / b
            if eager:
                g = torch.autograd.grad(loss, leaves, materialize_grads=True)
                grads = list(g) if grads is None else [a.add_(c) for a, c in zip(grads, g)]
                loss = loss.detach()
            total = loss if total is None else total + loss
            preds.append(pred.detach())
        assert total is not None
        if eager and grads is not None:
            # value: the mean query loss; gradient to each parameter: the accumulated meta-gradient
            surrogate = sum((p * g).sum() for p, g in zip(leaves, grads))
            total = total + surrogate - surrogate.detach()
        return total, self.task_metrics(torch.stack(preds), batch.query_labels)

    def step_predictions(self, batch: Episode, steps: int | None = None) -> torch.Tensor:
        """Query predictions before adaptation and after each of ``steps`` (default
        ``test_inner_steps``) inner steps, without meta-gradients: [B, steps + 1, Q, ...]."""
        steps = self.test_inner_steps if steps is None else steps
        params = {n: p.detach().requires_grad_(n in self.adapted) for n, p in self.params().items()}
        if self._use_vmap(batch):
            with torch.no_grad():
                return self._vmap_adapt(params, batch, steps, True, record_from=0)
        per_task = []
        for i in range(batch.support.shape[0]):
            outs: list[torch.Tensor] = []

            def record(step: int, p: Params, xq: torch.Tensor = batch.query[i],
                       outs: list[torch.Tensor] = outs) -> None:
                with torch.no_grad():
                    outs.append(self.forward(p, xq, _query_set(step)))

            with torch.enable_grad():
                self.adapt(params, batch.support[i], batch.support_labels[i], steps, False, record)
            per_task.append(torch.stack(outs))
        return torch.stack(per_task)

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


__all__ = ["MAML", "MAMLRegression", "PlainBatchNorm", "batch_statistics", "split_params"]
