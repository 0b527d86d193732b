"""``sharding.plan``: disjoint shard coverage, equal batch counts per rank, delivery order and resume layout."""

from __future__ import annotations

import pytest

from sharding.plan import EpochPlan, delivery_order, plan_epoch, resume_layout, seeded_rng


def test_uneven_shards_are_covered_once_with_equal_batches_per_rank():
    counts = [5, 1, 4, 2, 3, 7, 2, 6, 1]
    orders = set()
    for epoch in range(4):
        plan = plan_epoch(counts, world_size=2, num_workers=2, batch_size=2, epoch=epoch, seed=3)
        assert [sum(q) for q in plan.quotas] == [plan.batches] * 2
        used = sorted(i for r in plan.shards for w in r for i in w)
        assert used == list(range(len(counts)))  # every shard read by exactly one worker of one rank
        for r in range(2):
            for w in range(2):
                assert plan.quotas[r][w] * 2 <= sum(counts[i] for i in plan.shards[r][w])
        orders.add(plan.shards)
        # the same on every rank and process: a pure function of its arguments
        assert plan == plan_epoch(counts, world_size=2, num_workers=2, batch_size=2, epoch=epoch, seed=3)
    assert len(orders) > 1  # reshuffled per epoch
    fixed = plan_epoch(counts, world_size=2, num_workers=2, batch_size=2, epoch=0, seed=3, shuffle_shards=False)
    assert fixed.shards == (((0, 4, 8), (2, 6)), ((1, 5), (3, 7)))


def test_plan_errors_say_what_to_do():
    with pytest.raises(ValueError, match=r"3 shard\(s\).*--samples-per-shard 3.*num_workers <= 1"):
        plan_epoch([4, 4, 4], world_size=2, num_workers=2, batch_size=2, epoch=0, seed=0)
    with pytest.raises(ValueError, match="not enough samples for one batch of 16"):
        plan_epoch([4, 4], world_size=1, num_workers=2, batch_size=16, epoch=0, seed=0)
    with pytest.raises(ValueError, match="unknown"):
        plan_epoch([4, None], world_size=1, num_workers=1, batch_size=1, epoch=0, seed=0)
    with pytest.raises(ValueError, match="only possible with world_size=1"):
        plan_epoch([4, 4], world_size=2, num_workers=1, batch_size=1, epoch=0, seed=0, drop_last=False)


def test_resampled_plans_split_the_epoch_length_over_workers():
    p = plan_epoch([3, None], world_size=2, num_workers=3, batch_size=2, epoch=0, seed=0, resampled=True,
                   epoch_length=7)
    assert p == EpochPlan(7, None, ((3, 2, 2), (3, 2, 2)))
    assert plan_epoch([3], world_size=1, num_workers=2, batch_size=1, epoch=0, seed=0, resampled=True).batches is None


def test_delivery_order_and_resume_layout():
    quotas = (3, 1, 2)
    order = delivery_order(quotas)
    assert order == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]  # round-robin, finished workers skipped
    for start in range(len(order)):
        first, done, todo = resume_layout(quotas, start)
        assert first == order[start][0]
        assert [d + t for d, t in zip(done, todo)] == list(quotas)
        assert done == [sum(1 for w, _ in order[:start] if w == k) for k in range(3)]
    assert resume_layout(quotas, 6) == (0, [3, 1, 2], [0, 0, 0])
    assert seeded_rng("a", 1).random() == seeded_rng("a", 1).random() != seeded_rng("a", 2).random()
