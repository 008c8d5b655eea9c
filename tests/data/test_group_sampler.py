"""Tests of the grouped batch sampler and Pan-FM's token-count buckets (medfm.data.group_sampler, .panfm)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from medfm.data import ORGANS, GroupBatchSampler, length_buckets, subject_token_counts, token_bucket_sampler

# tokens per organ with train.json's grids and patch 16
TOKENS = {"brain": 252, "heart": 48, "adipose": 48, "liver": 75, "kidney": 48, "spleen": 36, "pancreas": 24}


def _datalist(n=53, seed=0, rate=0.5):
    rng = random.Random(seed)
    items = []
    for i in range(n):
        present = [rng.random() >= rate for _ in ORGANS]
        present[rng.randrange(len(ORGANS))] = True
        items.append({"subject": f"s{i}", "present": present})
    return items


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_token_counts_are_the_sum_over_present_organs():
    items = _datalist(20)
    counts = subject_token_counts(items, TOKENS)
    for item, c in zip(items, counts):
        assert c == sum(n for (o, n), p in zip(TOKENS.items(), item["present"]) if p)
    assert subject_token_counts([{"present": [True] * 7}], TOKENS) == [531]
    assert subject_token_counts([{"present": [True] * 7}], {"brain": 252}) == [252]  # organs the network lacks: 0


def test_buckets_are_equal_frequency_ranges_of_whole_batches():
    lengths = [random.Random(1).randrange(24, 532) for _ in range(53)]
    buckets = length_buckets(lengths, num_buckets=4, batch_size=4)
    size = 16  # ceil(53 / 4 / 4) * 4
    assert [buckets.count(k) for k in range(4)] == [size, size, size, 53 - 3 * size]
    for k in range(3):  # consecutive ranges: every length of bucket k <= every length of bucket k + 1
        below = max(x for x, b in zip(lengths, buckets) if b == k)
        assert below <= min(x for x, b in zip(lengths, buckets) if b == k + 1)
    assert length_buckets(lengths, 1, 4) == [0] * 53


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_subject_once_per_epoch_batches_within_a_bucket_deterministic(drop_last):
    items = _datalist()
    counts = subject_token_counts(items, TOKENS)
    buckets = length_buckets(counts, 4, 5)
    sampler = token_bucket_sampler(items, TOKENS, batch_size=5, num_buckets=4, seed=3, drop_last=drop_last)
    for epoch in (0, 1):
        batches = _epoch(sampler, epoch)
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen))
        if drop_last:
            assert all(len(b) == 5 for b in batches)
            assert len(seen) == 50  # buckets of 15, 15, 15, 8: only the last loses 3
        else:
            assert sorted(seen) == list(range(len(items)))
        for b in batches:
            assert len({buckets[i] for i in b}) == 1
        assert len(batches) == len(sampler)
    assert _epoch(sampler, 0) == _epoch(sampler, 0)
    assert _epoch(sampler, 0) != _epoch(sampler, 1)
    again = token_bucket_sampler(items, TOKENS, batch_size=5, num_buckets=4, seed=3, drop_last=drop_last)
    assert _epoch(again, 1) == _epoch(sampler, 1)
    other = token_bucket_sampler(items, TOKENS, batch_size=5, num_buckets=4, seed=4, drop_last=drop_last)
    assert _epoch(other, 1) != _epoch(sampler, 1)


@pytest.mark.parametrize("replicas", [2, 3])
def test_ddp_shards_split_the_global_batches(replicas):
    items = _datalist(40)
    samplers = [token_bucket_sampler(items, TOKENS, 4, num_buckets=3, seed=1, num_replicas=replicas, rank=r)
                for r in range(replicas)]  # fmt: skip
    for epoch in (0, 2):
        per_rank = [_epoch(s, epoch) for s in samplers]
        assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
        glob = samplers[0].global_batches()
        assert list(itertools.chain(*zip(*per_rank))) == glob[: len(per_rank[0]) * replicas]
        seen = {i for batches in per_rank for b in batches for i in b}
        assert seen == set(range(40))  # padding repeats batches, never loses one


def test_bucketing_cuts_padding():
    items = _datalist(400, rate=0.6)
    counts = subject_token_counts(items, TOKENS)

    def padded(sampler):
        return sum(max(counts[i] for i in b) * len(b) for b in _epoch(sampler, 0))

    bucketed = padded(token_bucket_sampler(items, TOKENS, 4, num_buckets=25))
    shuffled = padded(token_bucket_sampler(items, TOKENS, 4, num_buckets=1))
    assert bucketed < 0.8 * shuffled
    assert bucketed < 1.1 * sum(counts)


def test_group_sampler_and_ill_arguments():
    sampler = GroupBatchSampler(["b", "a", "b", "a", "a"], 2, shuffle=False)
    assert list(sampler) == [[1, 3], [4], [0, 2]]
    with pytest.raises(ValueError, match="present"):
        subject_token_counts([{"subject": "x"}], TOKENS)
    with pytest.raises(ValueError, match="num_buckets"):
        length_buckets([1, 2], 0, 1)
    with pytest.raises(ValueError, match="batch_size"):
        token_bucket_sampler(_datalist(4), TOKENS, 0)
    with pytest.raises(ValueError, match="empty"):
        GroupBatchSampler([], 2)
    loader = torch.utils.data.DataLoader(list(range(5)), batch_sampler=sampler)
    assert [b.tolist() for b in loader] == [[1, 3], [4], [0, 2]]


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_draw_from_the_same_bucket_at_each_step(replicas):
    items = _datalist(120)
    buckets = length_buckets(subject_token_counts(items, TOKENS), 5, 4)  # 5 buckets of 24 subjects = 6 batches
    samplers = [token_bucket_sampler(items, TOKENS, 4, num_buckets=5, seed=2, num_replicas=replicas, rank=r)
                for r in range(replicas)]  # fmt: skip
    for epoch in (0, 1):
        per_rank = [_epoch(s, epoch) for s in samplers]
        steps = list(zip(*per_rank))
        mixed = [k for k, step in enumerate(steps) if len({buckets[b[0]] for b in step}) > 1]
        # 6 batches per bucket: whole runs for 2 and 3 ranks, so every step is aligned
        assert mixed == []
        assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(120))
    # buckets whose batch count does not divide by the ranks: their leftovers come last
    samplers = [token_bucket_sampler(items[:100], TOKENS, 4, num_buckets=5, seed=2, num_replicas=2, rank=r)
                for r in range(2)]  # fmt: skip
    buckets = length_buckets(subject_token_counts(items[:100], TOKENS), 5, 4)  # 20 subjects = 5 batches each
    steps = list(zip(*[_epoch(s, 0) for s in samplers]))
    mixed = [k for k, step in enumerate(steps) if len({buckets[b[0]] for b in step}) > 1]
    assert all(k >= len(steps) - 3 for k in mixed)  # 5 leftover batches: the last 3 steps at most
    unaligned = GroupBatchSampler(buckets, 4, seed=2, num_replicas=2, rank=0, align_replicas=False)
    assert len(unaligned) == len(samplers[0])
