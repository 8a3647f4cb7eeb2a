"""The drop-and-grow skeleton (sparsity/methods/drop_grow.py) the five methods share: exact
selections per layer and over all layers, and the one commit path's two ways with a weight
dropped and grown in the same update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_bench.sparsity.masks import MaskSet
from sparse_bench.sparsity.methods.drop_grow import largest, random_scores, smallest


def _layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(6, 5, generator=g), torch.rand(7, generator=g)]
    masks = [torch.rand(6, 5, generator=g) < 0.5, torch.rand(7, generator=g) < 0.5]
    return scores, masks


def test_smallest_per_layer_is_the_dense_sort():
    scores, masks = _layers()
    budget = [int(m.sum()) // 2 for m in masks]
    got = smallest(scores, masks, budget)
    for s, m, k, pick in zip(scores, masks, budget, got):
        assert int(pick.sum()) == k and not (pick & ~m).any()
        worst_kept = s[m & ~pick].min()
        assert (s[pick] <= worst_kept).all()  # no kept active entry is smaller than a dropped one


def test_smallest_global_protects_each_layers_largest():
    scores, masks = _layers(1)
    total = sum(int(m.sum()) for m in masks)
    got = smallest(scores, masks, total - len(masks), floor=1)  # all the small ones of every layer
    for s, m, pick in zip(scores, masks, got):
        assert int((m & ~pick).sum()) == 1  # one weight left per layer
        assert s[m & ~pick].item() == s[m].max().item()  # the layer's largest
    assert sum(int(p.sum()) for p in got) == total - len(masks)


def test_largest_never_takes_blocked_and_caps_at_what_is_free():
    scores, masks = _layers(2)
    free = [int((~m).sum()) for m in masks]
    got = largest(scores, masks, [f + 5 for f in free])
    for m, pick, f in zip(masks, got, free):
        assert int(pick.sum()) == f and not (pick & m).any()
    flat = largest(scores, masks, 3)
    assert sum(int(p.sum()) for p in flat) == 3
    chosen = torch.cat([s[p] for s, p in zip(scores, flat)])
    rest = torch.cat([s[~m & ~p] for s, m, p in zip(scores, masks, flat)])
    assert chosen.min() >= rest.max()


def test_random_scores_global_is_one_draw_split_over_the_layers():
    like = [torch.zeros(3, 4), torch.zeros(5)]
    per = random_scores(like, "global", torch.Generator().manual_seed(3))
    flat = torch.rand(17, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([p.reshape(-1) for p in per]), flat)
    assert [tuple(p.shape) for p in per] == [(3, 4), (5,)]


@pytest.mark.parametrize("regrown", ["restart", "keep"])
def test_the_commit_path_restarts_or_keeps_a_weight_dropped_and_grown_at_once(regrown):
    from sparse_bench.sparsity.methods.drop_grow import DropAndGrow

    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1.0, 9.0).view(2, 4))
    ms = MaskSet([("weight", lin.weight)])
    ms.set_masks([torch.tensor([[True, True, False, False], [True, False, False, False]])])
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    opt.state[lin.weight]["momentum_buffer"] = torch.ones(2, 4)

    method = DropAndGrow.__new__(DropAndGrow)
    method.masks, method.regrown = ms, regrown
    method.reset = ("grown",) if regrown == "restart" else ("grown", "dropped")
    method.ctx = type("Ctx", (), {"optimizer": opt})()
    old = [ms.masks[0].clone()]
    dropped = [torch.tensor([[True, True, False, False], [False, False, False, False]])]  # (0,0), (0,1)
    grown = [torch.tensor([[True, False, True, False], [False, False, False, False]])]  # (0,0) again, (0,2)
    method.commit(old, dropped, grown)

    w, mom = lin.weight.detach(), opt.state[lin.weight]["momentum_buffer"]
    assert ms.masks[0].tolist() == [[True, False, True, False], [True, False, False, False]]
    assert w[0, 2] == 0 and mom[0, 2] == 0  # a new connection starts at 0, its momentum zeroed
    assert w[0, 1] == 0 and w[1, 0] == 5.0  # dropped at 0; untouched stays
    if regrown == "restart":
        assert w[0, 0] == 0 and mom[0, 0] == 0 and mom[0, 1] == 1  # SET / DSR: a fresh connection
    else:
        assert w[0, 0] == 1.0 and mom[0, 0] == 1 and mom[0, 1] == 0  # RigL: as if it had not moved

