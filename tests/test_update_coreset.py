"""Adding good images to a fitted model (issue #21): the greedy selection continued from
the bank, and the neighbors updated for the new rows only."""

import pytest
import torch

from patchcore_fast import ops, reference
from patchcore_fast.coreset import continue_coreset
from patchcore_fast.scoring import bank_neighbors, update_neighbors


def continued_by_the_plain_loop(chosen: torch.Tensor, new: torch.Tensor, k: int) -> list[int]:
    """The oracle: the farthest-point loop over new points whose distances start at the
    chosen centres (direct differences, float64)."""
    x = new.double()
    min_d = torch.cdist(x, chosen.double()).min(dim=1).values ** 2
    out = []
    for _ in range(k):
        i = int(torch.argmax(min_d))
        out.append(i)
        min_d = torch.minimum(min_d, ((x - x[i]) ** 2).sum(1))
        min_d[i] = -1.0
    return out


@pytest.mark.parametrize("n_new,k", [(1, 1), (37, 5), (500, 60), (64, 64), (10, 0)])
def test_continuation_is_the_greedy_loop_from_the_chosen_centres(n_new, k):
    g = torch.Generator().manual_seed(n_new)
    chosen = torch.randn(40, 8, generator=g)
    new = torch.randn(n_new, 8, generator=g) * 1.3
    got = continue_coreset(chosen, new, k)
    assert got.dtype == torch.int64 and got.shape == (k,)
    want = continued_by_the_plain_loop(chosen, new, k)
    assert got.tolist() == want
    if k == n_new:
        assert sorted(got.tolist()) == list(range(n_new))


def test_continuation_equals_a_selection_with_the_old_centres_first():
    """Selecting from [old selection; new points] with the old selection as the first
    centres is exactly what the greedy loop would do: check against reference's loop,
    which starts from one point, by building the case where the old bank is one point."""
    g = torch.Generator().manual_seed(5)
    pts = torch.randn(300, 6, generator=g)
    full = reference.greedy_coreset(torch.cat([pts[:1], pts[1:]]), 30, 0)
    cont = continue_coreset(pts[:1], pts[1:], 29) + 1
    assert cont.tolist() == full[1:].tolist()


def test_continuation_refuses_bad_k():
    with pytest.raises(ValueError, match="between 0 and"):
        continue_coreset(torch.zeros(2, 3), torch.zeros(4, 3), 5)


@pytest.mark.parametrize("m,added,b", [(200, 31, 9), (200, 1, 9), (5, 20, 9), (120, 0, 3),
                                       (50, 400, 9)])
def test_updated_neighbourhoods_equal_a_full_recompute(m, added, b):
    g = torch.Generator().manual_seed(m + added)
    bank = torch.randn(m + added, 16, generator=g)
    old = bank_neighbors(bank[:m], b)
    got = update_neighbors(bank, old, added, b)
    want = bank_neighbors(bank, b)
    assert got.shape == want.shape
    # Tie-tolerant: the same distances in the same order (indices can differ only on ties).
    dist = lambda hood: torch.linalg.vector_norm(bank[:, None] - bank[hood], dim=-1)  # noqa: E731
    torch.testing.assert_close(dist(got), dist(want), rtol=1e-5, atol=1e-6)
    assert (got == want).float().mean() > 0.999
