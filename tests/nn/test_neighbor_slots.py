"""Neighbour slots: ranks of edges in any order, the width, the placeholder."""

import torch

from pes_calc.nn.neighbor_slots import (
    NEIGHBOR_SLOTS,
    neighbor_ranks,
    slot_width,
    to_slots,
)


def test_ranks_follow_edge_order_within_each_centre():
    centres = torch.tensor([2, 0, 2, 2, 0, 3])
    ranks, width = neighbor_ranks(centres, 5, {})
    assert ranks.tolist() == [0, 0, 1, 2, 1, 0]
    assert width == 3
    # every (centre, rank) slot is used once
    assert (
        len({(c, r) for c, r in zip(centres.tolist(), ranks.tolist(), strict=True)})
        == 6
    )


def test_slots_hold_each_edge_once_and_zeros_elsewhere():
    centres = torch.tensor([1, 1, 0, 1])
    values = torch.arange(8.0).reshape(4, 2)
    ranks, width = neighbor_ranks(centres, 3, {})
    padded = to_slots(values, centres, ranks, 3, width)
    assert padded.shape == (3, 3, 2)
    assert padded.sum(dim=1).tolist() == [[4.0, 5.0], [8.0, 11.0], [0.0, 0.0]]
    assert torch.equal(padded[centres, ranks], values)


def test_width_is_at_least_two_and_a_placeholder_sets_it():
    assert slot_width(torch.tensor([0, 1, 2]), 3) == 2
    assert slot_width(torch.zeros(0, dtype=torch.long), 4) == 2
    centres = torch.tensor([0, 0, 1])
    placeholder = {NEIGHBOR_SLOTS: torch.zeros(7, dtype=torch.int8)}
    assert neighbor_ranks(centres, 2, placeholder)[1] == 7
