"""The LRUA memory (Santoro et al. 2016): least-used writes, usage, cosine reads, gradients."""

from __future__ import annotations

import torch

from metashot.nn.memory import LRUAMemory, MemoryState, empty_state, least_used, lrua_step

# -- the memory ------------------------------------------------------------------------------------


def _state(usage: list[float], heads: int = 1, width: int = 3, fill: float = 1.0) -> MemoryState:
    n = len(usage)
    s = empty_state(1, n, width, heads)
    return s._replace(memory=torch.full((1, n, width), fill), usage=torch.tensor([usage]))


def _step(state: MemoryState, write: torch.Tensor, gate: float = 0.0, gamma: float = 0.9):
    heads = state.read_weights.shape[1]
    keys = torch.randn(1, heads, state.memory.shape[2])
    return lrua_step(state, keys, torch.ones(1, heads), torch.full((1, heads), gate), write, gamma)


def test_write_goes_to_the_least_used_slot_and_zeroes_it() -> None:
    state = _state([3.0, 0.5, 2.0, 0.1, 1.0])  # slot 3 is the least used
    write = torch.tensor([[[0.2, -0.4, 0.6]]])
    _, new = _step(state, write, gate=0.0)  # gate 0: all of the write goes to w_lu
    assert torch.equal(new.write_weights[0, 0], torch.tensor([0.0, 0, 0, 1, 0]))
    # zeroed, then written: the slot holds exactly the written vector, not 1 + it
    assert torch.allclose(new.memory[0, 3], write[0, 0])
    others = [0, 1, 2, 4]
    assert torch.equal(new.memory[0, others], state.memory[0, others])


def test_each_head_takes_its_own_least_used_slot_and_only_the_least_used_is_zeroed() -> None:
    state = _state([3.0, 0.5, 2.0, 0.1, 1.0], heads=2)
    write = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]])
    _, new = _step(state, write, gate=0.0)
    assert new.write_weights[0].argmax(1).tolist() == [3, 1]
    assert torch.allclose(new.memory[0, 3], torch.ones(3))  # zeroed, + head 0's vector
    assert torch.allclose(new.memory[0, 1], torch.full((3,), 3.0))  # kept 1, + head 1's 2


def test_write_gate_interpolates_previous_read_and_least_used() -> None:
    state = _state([3.0, 0.5, 2.0, 0.1, 1.0])
    prev = torch.tensor([[[0.1, 0.2, 0.3, 0.0, 0.4]]])
    state = state._replace(read_weights=prev)
    _, new = _step(state, torch.ones(1, 1, 3), gate=0.75)
    expected = 0.75 * prev + 0.25 * torch.tensor([0.0, 0, 0, 1, 0])
    assert torch.allclose(new.write_weights, expected)


def test_least_used_breaks_ties_by_index() -> None:
    assert least_used(torch.zeros(2, 6), 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert least_used(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), 2).tolist() == [[1, 3]]


def test_usage_decays_by_gamma_plus_reads_and_writes() -> None:
    torch.manual_seed(0)
    mem = LRUAMemory(8, slots=10, width=4, heads=2, gamma=0.8)
    state = mem.initial_state(3)
    state = state._replace(usage=torch.rand(3, 10) * 5)
    _, new = mem(torch.randn(3, 8), state)
    expected = 0.8 * state.usage + new.read_weights.sum(1) + new.write_weights.sum(1)
    assert torch.allclose(new.usage, expected)
    # with no reads or writes the usage would be gamma * usage: read and write weights sum to
    # one per head, so the total grows by exactly 2 * heads (w_r(t-1) is empty in a new memory)
    total = 0.8 * state.usage.sum(1) + 2 + new.write_weights.sum((1, 2))
    assert torch.allclose(new.usage.sum(1), total)
    _, newer = mem(torch.randn(3, 8), new)
    assert torch.allclose(newer.usage.sum(1), 0.8 * new.usage.sum(1) + 2 * 2, atol=1e-5)


def test_read_weights_sum_to_one_and_reads_are_their_average_of_rows() -> None:
    torch.manual_seed(0)
    mem = LRUAMemory(8, slots=16, width=5, heads=3, strength=4.0)
    state = mem.initial_state(4)
    for _ in range(5):
        reads, state = mem(torch.randn(4, 8), state)
        assert torch.allclose(state.read_weights.sum(2), torch.ones(4, 3))
        assert (state.read_weights >= 0).all()
        expected = torch.einsum("brn,bnm->brm", state.read_weights, state.memory).flatten(1)
        assert torch.allclose(reads, expected, atol=1e-6)
    assert reads.shape == (4, mem.read_size)


def test_reads_follow_cosine_similarity() -> None:
    state = empty_state(1, 3, 2, 1)._replace(memory=torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]]),
                                            usage=torch.tensor([[5.0, 5.0, 5.0]]))
    key = torch.tensor([[[0.0, 0.3]]])
    _, new = lrua_step(state, key, torch.tensor([[50.0]]), torch.ones(1, 1), torch.zeros(1, 1, 2), 0.9)
    # slot 0 was least used and zeroed; the key points along slot 1's row
    assert new.read_weights[0, 0].argmax().item() == 1
    assert new.read_weights[0, 0, 1] > 0.99


def test_memory_gradients_reach_the_heads() -> None:
    mem = LRUAMemory(6, slots=8, width=4, heads=2)
    state = mem.initial_state(2)
    total = torch.zeros(())
    for _ in range(3):
        reads, state = mem(torch.randn(2, 6), state)
        total = total + reads.square().sum()
    total.backward()
    assert mem.heads_out.weight.grad is not None and mem.heads_out.weight.grad.abs().sum() > 0


