"""No host read inside a training step of any method (the CPU proxy of CUDA's sync census): metashot's
code calls no ``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``, ``torch.tensor`` or boolean-mask
index from a method's loss to its optimizer step. CUDA's own census is in tests/test_cuda.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmarks.sync_census import CASES, census, host_reads, make_case, train_step
from metashot.batches import SequenceBatch
from metashot.data.sequences import instance_counts
from metashot.methods.mann import accuracy_by_instance
from tests.methods.test_maml import _one_thread  # noqa: F401 (a fixture)


@pytest.mark.parametrize("name", list(CASES))
def test_a_training_step_reads_nothing_back_in_metashot_code(name: str) -> None:
    row = census(name)
    assert row["in_metashot"] == 0, row["where"]


def test_the_census_places_a_read_in_metashot_code() -> None:
    # a MANN that is not told its episodes' classes reads which presentations they show: one read
    cfg = CASES["mann"]
    row = census("mann", cfg=replace(cfg, method_args=cfg.method_args | {"classes": None}))
    assert row["in_metashot"] == 1 and any(w.startswith("tolist mann.py:") for w in row["where"])
    with host_reads() as reads:
        bool(torch.ones(2).sum() > 0)
        torch.ones(3)[torch.tensor([True, False, True])]
    assert [r.kind for r in reads] == ["__bool__", "torch.tensor", "bool-index"]
    assert not any(r.ours for r in reads)  # placed in this file, not metashot's


def test_mann_knows_its_instance_metrics_from_the_shape_as_from_the_data() -> None:
    g = torch.Generator().manual_seed(0)
    label = torch.stack([torch.arange(3).repeat_interleave(4)[torch.randperm(12, generator=g)]
                         for _ in range(2)])
    correct = torch.rand(2, 12, generator=g) < 0.5
    instance = instance_counts(label, 3)
    read = accuracy_by_instance(correct, instance)
    known = accuracy_by_instance(correct, instance, shown=4)
    assert set(known) == set(read) == {"acc", "acc_1", "acc_2", "acc_3", "acc_4"}
    for k in read:
        torch.testing.assert_close(known[k], read[k])
    by_hand = (correct & (instance == 2)).sum(1) / 3  # three classes each shown a 2nd time
    torch.testing.assert_close(known["acc_2"], by_hand.float())


def test_mann_built_from_its_task_steps_without_a_read_and_metrics_match() -> None:
    method, batch, optimizer = make_case(CASES["mann"], "cpu")
    assert method.classes == 5 and isinstance(batch, SequenceBatch)
    with host_reads() as reads:
        loss = train_step(method, batch, optimizer, 0)
    assert not [r for r in reads if r.ours] and loss.isfinite()
    with torch.no_grad():
        known = method.loss(batch)[1]
        method.classes = None  # the reading path gives the same metrics
        read = method.loss(batch)[1]
    assert set(read) == set(known) == {"acc", "acc_1", "acc_2", "acc_3"}
    for k in read:
        torch.testing.assert_close(known[k], read[k])
