"""External memory with least-recently-used access (LRUA), after Santoro et al., "Meta-Learning with
Memory-Augmented Neural Networks", ICML 2016 (the memory equations of its section 3: content-based
reads and least-recently-used access writes).

The memory is a module of its own: any controller that emits a vector ``h`` per step drives it with
``reads, state = memory(h, state)``, starting from ``memory.initial_state(batch)`` (an empty memory,
wiped for every episode). :func:`lrua_step` is the same step as a pure function of the heads' outputs.

One step, batched over B episodes, with N slots of width M and R heads (the paper's order):

1. ``w_lu(t-1)``: the R least-used slots of ``w_u(t-1)``; head h takes the h-th least used
   slot, so the heads' one-hot ``w_lu`` sum to the paper's vector with ones on the R least-used slots.
2. ``w_w(t) = sigmoid(alpha) w_r(t-1) + (1 - sigmoid(alpha)) w_lu(t-1)`` per head.
3. The least-used slot is zeroed, then ``M_t(i) = M_{t-1}(i) + sum_h w_w^h(i) a^h`` (the
   paper writes the key, ``a = k``, the default; ``write_key=False`` gives each head its own vector).
4. ``w_r(t)(i) = softmax_i(beta * cos(k_t, M_t(i)))`` (beta a key strength), ``r_t =
   sum_i w_r(t)(i) M_t(i)``.
5. ``w_u(t) = gamma w_u(t-1) + sum_h w_r^h(t) + sum_h w_w^h(t)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class MemoryState(NamedTuple):
    """The memory of B episodes between steps.

    memory: [B, N, M]; usage w_u: [B, N]; read_weights w_r: [B, R, N] (the last step's);
    write_weights w_w: [B, R, N] (the last step's, kept for inspection).
    """

    memory: torch.Tensor
    usage: torch.Tensor
    read_weights: torch.Tensor
    write_weights: torch.Tensor


def empty_state(
    batch: int, slots: int, width: int, heads: int,
    device: torch.device | str | None = None, dtype: torch.dtype | None = None,
) -> MemoryState:
    """A wiped memory: zero rows, zero usage, zero read and write weights."""
    kw = {"device": device, "dtype": dtype or torch.get_default_dtype()}
    return MemoryState(
        torch.zeros(batch, slots, width, **kw),
        torch.zeros(batch, slots, **kw),
        torch.zeros(batch, heads, slots, **kw),
        torch.zeros(batch, heads, slots, **kw),
    )


def least_used(usage: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the k least-used slots of ``usage`` [B, N], least used first (ties: lowest
    index first, so a fresh memory fills slots 0, 1, 2, ...)."""
    # a stable sort breaks ties by index; topk's order among equal values is unspecified
    return usage.sort(dim=1, stable=True).indices[:, :k]


def lrua_step(
    state: MemoryState,
    keys: torch.Tensor,
    strengths: torch.Tensor,
    gates: torch.Tensor,
    writes: torch.Tensor,
    gamma: float,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MemoryState]:
    """One LRUA write-then-read step.

    Args:
        state: the memory before the step (see :class:`MemoryState`).
        keys: read keys k_t, [B, R, M].
        strengths: key strengths beta >= 0, [B, R].
        gates: write gates sigmoid(alpha) in [0, 1], [B, R].
        writes: vectors written by each head, [B, R, M] (the paper writes the keys).
        gamma: usage decay in [0, 1].

    Returns:
        reads r_t [B, R, M] and the new state.
    """
    memory, usage, prev_read, _ = state
    b, n, _ = memory.shape
    r = keys.shape[1]
    lu = least_used(usage, r)  # [B, R]
    w_lu = torch.zeros(b, r, n, dtype=memory.dtype, device=memory.device).scatter_(2, lu.unsqueeze(2), 1.0)
    g = gates.unsqueeze(2)
    write_weights = torch.lerp(w_lu, prev_read, g)  # g * w_r(t-1) + (1 - g) * w_lu(t-1)
    keep = 1.0 - w_lu[:, 0].unsqueeze(2)  # zero the least-used slot: [B, N, 1]
    memory = torch.baddbmm(memory * keep, write_weights.transpose(1, 2), writes)
    # cosine similarity of each key with each row, [B, R, N]: dividing the [B, R, N] products by
    # the row norms costs less than normalising the [B, N, M] memory
    dots = torch.bmm(keys, memory.transpose(1, 2))
    norms = keys.norm(dim=2, keepdim=True) * memory.norm(dim=2).unsqueeze(1)
    similarity = dots / norms.clamp_min(eps)
    read_weights = torch.softmax(strengths.unsqueeze(2) * similarity, dim=2)
    reads = torch.bmm(read_weights, memory)
    usage = gamma * usage + (read_weights + write_weights).sum(1)
    return reads, MemoryState(memory, usage, read_weights, write_weights)


class LRUAMemory(nn.Module):
    """An N x M memory read and written by R heads with least-recently-used access.

    Args:
        input_size: width of the controller output ``h`` [B, input_size] that drives the heads.
        slots: N, memory rows (128 in the paper).
        width: M, row width (40).
        heads: R, read heads, each with its write (4).
        gamma: usage decay (the paper leaves it unstated; 0.95 by default, as common re-implementations).
        write_key: write the read key (the paper), else a separate tanh vector per head.
        strength: the key strength beta at initialisation (it is learnt: softplus of a head output).

    ``forward(h, state)`` returns reads [B, R * M] and the next state.
    """

    def __init__(
        self, input_size: int, slots: int = 128, width: int = 40, heads: int = 4, gamma: float = 0.95,
        write_key: bool = True, strength: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if heads > slots:
            raise ValueError(f"{heads} heads need at least {heads} slots, got {slots}")
        self.slots, self.width, self.heads, self.gamma = slots, width, heads, gamma
        self.write_key = write_key
        # per head: key (M), strength (1), gate (1), and a write vector (M) unless it is the key
        self.per_head = width + 2 + (0 if write_key else width)
        self.heads_out = nn.Linear(input_size, heads * self.per_head)
        self.reset_strength(strength)

    def reset_strength(self, strength: float) -> None:
        """Set the key strengths' bias so that beta starts at ``strength`` (softplus^-1)."""
        with torch.no_grad():
            bias = self.heads_out.bias.view(self.heads, self.per_head)
            bias[:, self.width] = math.log(math.expm1(strength))

    @property
    def read_size(self) -> int:
        """Width of the flattened reads, R * M."""
        return self.heads * self.width

    def initial_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MemoryState:
        """A wiped memory for ``batch`` episodes (call it at the start of every episode)."""
        device = device if device is not None else self.heads_out.weight.device
        return empty_state(batch, self.slots, self.width, self.heads, device,
                           dtype or self.heads_out.weight.dtype)

    def forward(self, h: torch.Tensor, state: MemoryState) -> tuple[torch.Tensor, MemoryState]:
        """Write then read with the heads computed from ``h`` [B, input_size]; reads [B, R * M]."""
        out = self.heads_out(h).view(h.shape[0], self.heads, self.per_head)
        m = self.width
        keys = torch.tanh(out[..., :m])
        strengths = F.softplus(out[..., m])
        gates = torch.sigmoid(out[..., m + 1])
        writes = keys if self.write_key else torch.tanh(out[..., m + 2:])
        reads, state = lrua_step(state, keys, strengths, gates, writes, self.gamma)
        return reads.flatten(1), state

    def extra_repr(self) -> str:
        return (f"slots={self.slots}, width={self.width}, heads={self.heads}, gamma={self.gamma}, "
                f"write_key={self.write_key}")
