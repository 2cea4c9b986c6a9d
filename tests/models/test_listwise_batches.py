"""Listwise batches (models/encoded.py groups/outputs) through every cut (models/cutting.py): a list is never
split, and scores find their way back to item order. Hand-made batches: sequence i holds `lengths[i]` copies of
id i, group and output counts chosen per test."""
from __future__ import annotations

import numpy as np
import pytest

from models.cutting import group_members, plan_groups, plan_pieces, scatter
from models.encoded import EncodedBatch


def listwise(lengths, groups, outputs) -> EncodedBatch:
    return EncodedBatch.from_lists([[i] * n for i, n in enumerate(lengths)], groups=groups, outputs=outputs)


def test_score_positions_follow_the_sequences():
    b = listwise([3, 1, 2, 4], groups=[0, 0, 1, 2], outputs=[2, 1, 3, 1])
    assert b.num_scores == 7 and len(b) == 4
    # scores: seq0 -> 0,1; seq1 -> 2; seq2 -> 3,4,5; seq3 -> 6
    assert b.score_index([2, 0]).tolist() == [3, 4, 5, 0, 1]
    assert b.score_index([3, 1]).tolist() == [6, 2]
    assert b.score_index([]).tolist() == []
    plain = EncodedBatch.from_lists([[1], [2, 3]])
    assert plain.num_scores == 2 and plain.score_index([1, 0]).tolist() == [1, 0]


def test_select_and_concat_carry_groups_and_keep_requests_apart():
    a = listwise([3, 1], groups=[0, 0], outputs=[2, 1])
    b = listwise([2, 2], groups=[0, 1], outputs=[1, 1])
    sub = a.select([1, 0])
    assert sub.groups.tolist() == [0, 0] and sub.outputs.tolist() == [1, 2]
    both = EncodedBatch.concat([a, b])
    assert both.outputs.tolist() == [2, 1, 1, 1]
    g = both.groups.tolist()
    assert g[0] == g[1] and len({g[1], g[2], g[3]}) == 3  # b's lists are new lists, not a's
    with pytest.raises(ValueError, match="listwise"):
        EncodedBatch.concat([a, EncodedBatch.from_lists([[5]])])
    with pytest.raises(ValueError, match="both"):
        EncodedBatch.from_lists([[1]], groups=[0])


def test_group_members_in_order_of_first_appearance():
    members = group_members(np.array([7, 3, 7, 1, 3]))
    assert [m.tolist() for m in members] == [[0, 2], [1, 4], [3]]


@pytest.mark.parametrize("seed", range(5))
def test_fanout_pieces_and_replica_parts_never_split_a_list(seed):
    rng = np.random.default_rng(seed)
    n = 40
    lengths = rng.integers(5, 300, n)
    groups = np.sort(rng.integers(0, 12, n))
    outputs = rng.integers(1, 5, n)
    batch = listwise(lengths, groups, outputs)
    for plan in (plan_pieces(batch.lengths, piece_tokens=500, max_pieces=8, groups=batch.groups),
                 plan_groups(batch.lengths, batch.groups, 700)):
        assert sorted(np.concatenate(plan).tolist()) == list(range(n))  # every sequence once
        owner = {}
        for k, part in enumerate(plan):
            for g in set(groups[part].tolist()):
                assert owner.setdefault(g, k) == k  # each list in one part only
        # scores of the parts go back to the batch's score order
        parts = [np.asarray(batch.score_index(p), dtype=np.float32) for p in plan]
        back = scatter([batch.score_index(p) for p in plan], parts, batch.num_scores)
        assert back.tolist() == list(range(batch.num_scores))
    parts = plan_groups(batch.lengths, batch.groups, 700)
    for part in parts:  # within the budget unless a single list is larger
        assert batch.lengths[part].sum() <= 700 or len(set(groups[part].tolist())) == 1
    assert len(plan_pieces(batch.lengths, piece_tokens=500, max_pieces=8, groups=np.zeros(n, np.int64))) == 1
