"""Adding good images to a fitted model (issue #21): the greedy selection continued from
the bank, and the neighbors updated for the new rows only."""

import pytest
import torch

from patchcore_fast import ops, reference
from patchcore_fast.coreset import continue_coreset
from patchcore_fast.scoring import (NeighborsOnDemand, bank_neighbors, score_patches,
                                    update_neighbors)


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


def _continued(new: torch.Tensor, min_d: torch.Tensor, k: int, lazy: bool, impl=ops
               ) -> list[int]:
    """The continuation's loop (as continue_coreset runs it) on a state started at
    ``min_d``, through ``impl`` (ops: the kernel, lazy or plain; reference: the twin)."""
    state = impl.coreset_shard_state(new, k, lazy, min_d)
    first = int(torch.argmax(min_d))
    record = torch.zeros(new.shape[1] + 2, dtype=torch.int32, device=new.device)
    record[:2] = reference.pack_keys(min_d[first:first + 1].cpu(),
                                     torch.tensor([first])).view(torch.int32)
    record[2:] = new[first].view(torch.int32)
    out = torch.empty(k, dtype=torch.int64, device=new.device)
    for step in range(k):
        record = impl.coreset_shard_step(new, record.view(1, -1), 0, state, out, step)
    return out.tolist()


def _lowrank(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Rank-6 rows with faint noise far from the origin: the lazy kernel's bound prunes."""
    z = torch.randn(n, 6, generator=g) @ torch.randn(6, d, generator=g)
    return z + 1e-3 * torch.randn(n, d, generator=g) + 100.0


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("kind", ["gaussian-8", "duplicates-8", "lowrank-128",
                                  "lowrank-duplicates-128", "gaussian-128"])
def test_started_state_lazy_equals_plain_and_the_oracle(kind, device):
    """coreset_shard_state(start=): the lazy state (bound off below 64 columns, on at 128)
    and the plain pass continue the selection from the same start, index for index, and
    equal the float64 oracle where the data has no near-ties. Starts of 0 (new points
    equal to chosen centres) and +inf (a row no chosen centre covers) included."""
    g = torch.Generator().manual_seed(len(kind))
    name, d = kind.rsplit("-", 1)
    d = int(d)
    pool = _lowrank(900, d, g) if name.startswith("lowrank") else torch.randn(900, d, generator=g)
    if "duplicates" in name:
        pool = pool[torch.randint(0, 90, (900,), generator=g)]
    chosen, new = pool[:100], pool[100:].contiguous()
    min_d = torch.cdist(new.double(), chosen.double()).min(dim=1).values.square().float()
    min_d[7] = float("inf")
    k = 300
    new, min_d = new.to(device), min_d.to(device)
    plain = _continued(new, min_d, k, lazy=False)
    lazy = _continued(new, min_d, k, lazy=True)
    assert lazy == plain
    assert len(set(lazy)) == k and lazy[0] == 7
    if name in ("gaussian",):
        assert plain == _continued(new, min_d, k, lazy=False, impl=reference)
        want = torch.cdist(new.cpu().double(), chosen.double()).min(dim=1).values ** 2
        want[7] = float("inf")
        x, got = new.cpu().double(), []
        for _ in range(k):
            i = int(torch.argmax(want))
            got.append(i)
            want = torch.minimum(want, ((x - x[i]) ** 2).sum(1))
            want[i] = -1.0
        assert lazy == got


def test_continuation_lazy_with_the_bound_equals_the_oracle():
    # 128 columns (the selection's projection width): the lazy kernel's bound is on.
    g = torch.Generator().manual_seed(3)
    chosen, new = torch.randn(300, 128, generator=g), torch.randn(2000, 128, generator=g) * 1.2
    got = continue_coreset(chosen, new, 250)
    assert got.tolist() == continued_by_the_plain_loop(chosen, new, 250)


@pytest.mark.parametrize("start,words", [
    (lambda x: torch.zeros(x.shape[0], dtype=torch.float64), "start should be"),
    (lambda x: torch.zeros(x.shape[0] + 1), "start should be"),
    (lambda x: torch.zeros(x.shape[0], 1), "start should be"),
], ids=["dtype", "length", "2-d"])
def test_started_state_refuses_a_bad_start(start, words):
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=words):
        ops.coreset_shard_state(x, 3, True, start(x))
    with pytest.raises(RuntimeError, match=words):
        torch.ops.patchcore_fast.coreset_shard_state.default(x, 3, True, start(x))


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


@pytest.mark.parametrize("m,b", [(300, 9), (9, 9), (5, 9), (200, 1)])
def test_neighbors_on_demand_equal_the_table(m, b):
    """A calibration fold's neighbors, computed for the rows read, are those rows of the
    whole table; duplicated rows (equal distances: the lower row first) included."""
    g = torch.Generator().manual_seed(m)
    bank = torch.randn(m, 64, generator=g)
    bank[m // 2:m // 2 + 3] = bank[1]  # exact ties
    table = bank_neighbors(bank, b)
    lazy = NeighborsOnDemand(bank, b)
    assert lazy.shape == tuple(table.shape)
    rows = torch.tensor([0, m - 1, 1, m // 2, 1])
    assert torch.equal(lazy[rows], table[rows])


def test_image_scores_with_neighbors_on_demand_equal_the_table():
    g = torch.Generator().manual_seed(1)
    bank, patches = torch.randn(400, 32, generator=g), torch.randn(3, 49, 32, generator=g)
    table = score_patches(patches, bank, bank_neighbors(bank, 9), (7, 7), (56, 56), 4.0)
    lazy = score_patches(patches, bank, NeighborsOnDemand(bank, 9), (7, 7), (56, 56), 4.0)
    assert torch.equal(table[0], lazy[0]) and torch.equal(table[1], lazy[1])
