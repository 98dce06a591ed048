"""tinymoe's tie convention: equal scores go to the lowest index, in every selection.

This is our own convention (a stable sort), not torch's: ``torch.topk`` promises no order
for ties and on CPU returns ``[6, 5]`` for ``topk(zeros(8), 2)``.
"""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe import ops
from tinymoe.moe.aux_free import aux_free_gates
from tinymoe.moe.expert_choice import expert_choice_positions
from tinymoe.moe.gshard import top2
from tinymoe.moe.switch import switch_route
from tinymoe.moe.topk_router import topk_gates


def test_ops_topk_all_tied_picks_the_first_k():
    _, i = ops.topk(tm.tensor(np.zeros(8)), 2)
    np.testing.assert_array_equal(i, [0, 1])  # torch.topk on CPU: [6, 5]
    _, i = ops.topk(tm.tensor(np.zeros((3, 8))), 3, axis=1)
    np.testing.assert_array_equal(i, np.tile([0, 1, 2], (3, 1)))
    # a tie behind a strict winner: the winner first, then the lower of the tied
    _, i = ops.topk(tm.tensor([0.0, 0.5, 0.5, 0.9, 0.5]), 3)
    np.testing.assert_array_equal(i, [3, 1, 2])


@pytest.mark.task6_1
def test_routers_break_ties_by_lowest_expert_index():
    probs = tm.tensor(np.full((4, 8), 1 / 8))  # every expert tied for every token
    idx, _ = topk_gates(probs, 2)
    np.testing.assert_array_equal(idx, np.tile([0, 1], (4, 1)))
    first, second = top2(probs.data)
    np.testing.assert_array_equal(first, 0)
    np.testing.assert_array_equal(second, 1)
    idx, _ = aux_free_gates(tm.tensor(np.full((4, 8), 0.5)), np.zeros(8), 3)
    np.testing.assert_array_equal(idx, np.tile([0, 1, 2], (4, 1)))
    r = switch_route(tm.tensor(np.zeros((4, 8))), probs, 8.0)
    np.testing.assert_array_equal(r.expert_index[:, 0], 0)


@pytest.mark.task6_2
def test_expert_choice_ties_go_to_the_lowest_token_index():
    pos = expert_choice_positions(np.full((6, 2), 0.5), 2)  # (T, E) slot or -1
    taken = [sorted(np.flatnonzero(pos[:, e] >= 0).tolist()) for e in range(2)]
    assert taken == [[0, 1], [0, 1]]
