"""Pieces of MAML's inner loop that its variants add (see :class:`~metashot.methods.maml.MAML`), each a
constructor argument and a ``method_args`` key:

- MAML++ (Antoniou, Edwards & Storkey, ICLR 2019, "How to train your MAML", section 4).
  ``msl_steps``: multi-step loss, L = sum_{i=1..S} v_i L^query(theta_i) over the S inner steps, the
  weights v annealed from uniform toward the last step over the first ``msl_steps`` optimizer steps,
  then the last step's loss alone (:func:`msl_weights`).
  ``first_order_steps``: derivative-order annealing, first order while the optimizer step (given by
  ``on_step``) is below it, second order from it on.
  ``per_step_bn``: per-step batch norm, a scale and shift (BNWB) and, with ``batch_norm="inductive"``,
  running statistics (BNRS) per inner step for every batch-norm layer of the model, substituted through
  ``functional_call`` (:class:`PerStepBatchNorm`). As in the authors' code, inner step k's support pass
  (at theta_k) and the query pass after it (at theta_{k+1}) use set k; the query before adaptation uses
  set 0.
  ``learned_lr="lslr"``: learned per-layer per-step learning rates, theta_{k+1} = theta_k - alpha_{l,k}
  grad_l L^support(theta_k), one alpha per parameter tensor l and inner step k, initialised to
  ``inner_lr`` and meta-learned (:func:`learned_rates`).
  The cosine annealing of the outer learning rate is the trainer's (``Config.schedule="cosine"``).
- Meta-SGD (Li, Zhou, Chen & Li 2017, section 3): ``learned_lr="metasgd"``, theta' = theta - alpha o
  grad L^support(theta) with alpha a meta-learned tensor of each parameter's shape (o: elementwise),
  initialised to ``inner_lr``.
- Memory-efficient MAML (gradient checkpointing, Chen et al. 2016, per inner step): ``recompute=True``
  keeps only each second-order inner step's input parameters and recomputes the step in the backward
  pass (:func:`recomputed_step`), so the memory of the activations no longer grows with the inner steps;
  the meta-gradient prod_k (I - alpha H_k) grad L^query(theta_S) is the same. It runs in the loop only.
  The recomputation replays the forward's random draws (dropout and DropBlock masks: the CPU generator
  and the inputs' devices') and autocast state, then gives the caller's random state back, as
  ``torch.utils.checkpoint`` with ``preserve_rng_state=True`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import get_device_states, set_device_states

Params = dict[str, torch.Tensor]
# floor of a non-final step's weight, times the number of steps (the authors' code: 0.03 / S)
MSL_FLOOR = 0.03


def msl_weights(step: int, steps: int, msl_steps: int) -> list[float] | None:
    """MAML++'s multi-step loss weights v_1..v_S at optimizer step ``step``, or None (the last step's
    query loss alone) when ``msl_steps`` is 0 or has passed.

    Antoniou et al. 2019, section 4, "Multi-Step Loss Optimization": L = sum_i v_i L_query(theta_i), as in
    the authors' ``get_per_step_loss_importance_vector`` with its per-epoch decay spread over the
    ``msl_steps`` = epochs * iterations optimizer steps. With S = ``steps``, t = ``step``, T = ``msl_steps``:

        v_i = max(1/S - t / (S T), 0.03 / S)                  i < S
        v_S = min(1/S + t (S - 1) / (S T), 1 - 0.03 (S - 1) / S)

    uniform at t = 0; the weights sum to 1 (both clamps bind from t = 0.97 T on). Python floats: each
    scales its step's loss as a kernel argument, so no tensor is copied to the device for them (the
    host-sync census, benchmarks/sync_census.py, checks the step).
    """
    if msl_steps <= 0 or step >= msl_steps:
        return None
    decay = step / (steps * msl_steps)
    rest = [max(1 / steps - decay, MSL_FLOOR / steps)] * (steps - 1)
    last = min(1 / steps + (steps - 1) * decay, 1 - (steps - 1) * MSL_FLOOR / steps)
    return [*rest, last]


class PerStepBatchNorm(nn.Module):
    """A scale and shift, and (with ``track_running_stats``) running statistics, per inner step for each
    batch-norm layer of ``model`` (MAML++'s BNWB and BNRS), initialised from the layer's own.

    ``at(k)`` maps the layers' tensor names (``"0.1.weight"``, ``"0.1.running_mean"``, ...) to row k
    (k clamped to ``sets - 1``) of the per-step tensors, for ``functional_call``: the model is not
    modified, its own scale and shift are just not used. Running statistics rows are views, so batch
    norm's in-place update of them lands in this module's buffers. Parameters [sets, C], buffers
    [sets, C] and [sets].
    """

    def __init__(self, model: nn.Module, sets: int) -> None:
        super().__init__()
        self.sets = sets
        self.names: list[tuple[str, str]] = []  # (name in the model, attribute here)
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for i, (prefix, layer) in enumerate(layers):
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                t = getattr(layer, key)
                if t is None:
                    continue
                rows = t.detach().unsqueeze(0).repeat(sets, *[1] * t.dim())
                if key in ("weight", "bias"):
                    self.register_parameter(f"{key}_{i}", nn.Parameter(rows, t.requires_grad))
                else:
                    self.register_buffer(f"{key}_{i}", rows)
                self.names.append((f"{prefix}.{key}" if prefix else key, f"{key}_{i}"))

    def at(self, step: int) -> dict[str, torch.Tensor]:
        k = min(step, self.sets - 1)
        return {name: getattr(self, attr)[k] for name, attr in self.names}

    def replaced(self) -> list[str]:
        """The model's parameter names that ``at`` replaces (its batch-norm scales and shifts)."""
        return [name for name, attr in self.names if attr.startswith(("weight_", "bias_"))]


def learned_rates(
    model: nn.Module, adapted: Sequence[str], kind: str, sets: int, inner_lr: float
) -> nn.ParameterList | None:
    """The meta-learned inner learning rates of the ``adapted`` tensors, initialised to ``inner_lr``:
    for ``kind="lslr"`` (MAML++) one alpha_{l,k} per tensor l and inner step k ([sets] each), for
    ``"metasgd"`` an alpha_l of each tensor's shape; None for ``"none"``."""
    params = dict(model.named_parameters())
    if kind == "lslr":
        return nn.ParameterList(
            torch.full((sets,), inner_lr, dtype=params[n].dtype, device=params[n].device) for n in adapted
        )
    if kind == "metasgd":
        return nn.ParameterList(torch.full_like(params[n].detach(), inner_lr) for n in adapted)
    return None


class _Replay:
    """The random and autocast state of a forward pass, to run it again alike in the backward (as
    ``torch.utils.checkpoint`` with ``preserve_rng_state=True``): the CPU generator, the generators of
    the inputs' devices, and autocast's setting on the CPU and on that device type."""

    def __init__(self, inputs: Sequence[torch.Tensor]) -> None:
        types = [t.device.type for t in inputs if t.device.type != "cpu"]
        # CUDA first, as torch.utils.checkpoint; with CPU inputs only, no device generator is touched
        self.device_type = "cuda" if "cuda" in types or not types else types[0]
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*inputs)  # none for CPU tensors
        self.autocast = {t: (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
                         for t in dict.fromkeys(("cpu", self.device_type))
                         if torch.amp.is_autocast_available(t)}
        self.cache = torch.is_autocast_cache_enabled()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """Inside: the forward's state; after: the random state from before, so the replay draws
        nothing from the caller's random stream."""
        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type), \
                contextlib.ExitStack() as stack:
            torch.set_rng_state(self.cpu_state)
            set_device_states(self.devices, self.device_states, device_type=self.device_type)
            for t, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(t, dtype=dtype, enabled=enabled, cache_enabled=self.cache))
            yield


class _Recomputed(torch.autograd.Function):
    """outputs = fn(inputs), keeping only the inputs; the backward recomputes fn with a graph, with the
    forward's random draws and autocast state (:class:`_Replay`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        fn: Callable[[list[torch.Tensor], bool], list[torch.Tensor]],
        buffers: list[torch.Tensor],
        *inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        ctx.fn, ctx.buffers, ctx.replay = fn, buffers, _Replay(inputs)  # type: ignore[attr-defined]
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():  # fn differentiates inside; its graph is dropped on return
            out = fn([t.detach().requires_grad_(t.requires_grad) for t in inputs], False)
        return tuple(o.detach() for o in out)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, *grad_out: torch.Tensor) -> tuple:
        needs = ctx.needs_input_grad[2:]  # type: ignore[attr-defined]
        inputs = [t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, needs)]  # type: ignore
        kept = [b.clone() for b in ctx.buffers]  # type: ignore[attr-defined]
        with torch.enable_grad(), ctx.replay():  # type: ignore[attr-defined]
            out = ctx.fn(inputs, True)  # type: ignore[attr-defined]
        wrt = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
        # the recomputation must not count batch statistics twice; copied through .data, since batch
        # norm's graph nodes saved views of these buffers and check their version
        for b, k in zip(ctx.buffers, kept):  # type: ignore[attr-defined]
            b.data.copy_(k)
        return (None, None, *(next(grads) if t.requires_grad else None for t in inputs))


def recomputed(
    fn: Callable[[list[torch.Tensor], bool], list[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor] = (),
) -> list[torch.Tensor]:
    """``fn(inputs, create_graph)`` run without keeping its graph: the backward pass runs it again with
    ``create_graph=True`` and differentiates that, so the gradient is exact (second order through an
    inner gradient step) while only ``inputs`` stay in memory. ``buffers`` that ``fn`` updates in place
    (batch-norm running statistics) are restored after the recomputation."""
    return list(_Recomputed.apply(fn, list(buffers), *inputs))


def recomputed_step(
    step: Callable[[Params, Params, list[Any], bool], Params],
    adapted: Sequence[str],
    params: Params,
    norm: Params,
    lrs: list[Any],
    buffers: Sequence[torch.Tensor] = (),
) -> Params:
    """``step(params, norm, lrs, create_graph)``, an inner step giving the ``adapted`` tensors after it,
    to second order through :func:`recomputed`: its inputs are the tensors of ``params``, ``norm`` (the
    batch-norm tensors) and ``lrs`` (the step sizes) that require gradients."""
    names = [n for n, p in params.items() if p.requires_grad]
    keys = [k for k, t in norm.items() if t.requires_grad]
    rates = [i for i, lr in enumerate(lrs) if isinstance(lr, torch.Tensor)]

    def fn(ts: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
        it = iter(ts)  # the tensors below, in their order
        p = {**params, **{n: next(it) for n in names}}
        nm = {**norm, **{k: next(it) for k in keys}}
        r = list(lrs)
        for i in rates:
            r[i] = next(it)
        return list(step(p, nm, r, create_graph).values())

    inputs = [params[n] for n in names] + [norm[k] for k in keys] + [lrs[i] for i in rates]
    return dict(zip(adapted, recomputed(fn, inputs, buffers)))


__all__ = ["PerStepBatchNorm", "learned_rates", "msl_weights", "recomputed", "recomputed_step"]
