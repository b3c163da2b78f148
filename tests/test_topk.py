import math

import pytest
import torch

from dms_llm.topk import DifferentiableTopK, integer_ranks, normalized_ranks


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 64, 192])
def test_hard_count_is_round_of_kept_fraction(n):
    op = DifferentiableTopK(n, rows=3, min_units=0)
    op.set_importance(torch.rand(3, n))
    for a in torch.linspace(0, 1, 41).tolist():
        with torch.no_grad():
            op.ratio.fill_(a)
        expected = math.floor((1 - a) * n + 0.5)
        assert op.kept_counts().tolist() == [expected] * 3
        assert op.hard_mask().sum(dim=1).tolist() == [expected] * 3


def test_hard_mask_keeps_most_important_units():
    op = DifferentiableTopK(6, rows=1)
    op.set_importance(torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2]]))
    with torch.no_grad():
        op.ratio.fill_(0.5)
    assert op.kept_indices() == [[0, 2, 4]]


def test_ranks_distinct_and_ties_broken_by_index():
    c = torch.tensor([[1.0, 1.0, 1.0, 2.0, 0.0, 1.0]])
    ranks = integer_ranks(c)
    assert sorted(ranks[0].tolist()) == list(range(6))
    # among the equal units 0, 1, 2, 5 the lower index ranks higher
    assert ranks[0, 0] > ranks[0, 1] > ranks[0, 2] > ranks[0, 5]
    assert ranks[0, 3] == 5 and ranks[0, 4] == 0
    assert torch.equal(integer_ranks(c), ranks)  # deterministic
    r = normalized_ranks(c)
    assert float(r.min()) == 0.0 and float(r.max()) < 1.0
    op = DifferentiableTopK(6)
    op.set_importance(torch.zeros(1, 6))
    with torch.no_grad():
        op.ratio.fill_(0.5)
    assert op.kept_indices() == [[0, 1, 2]]


def test_gradient_of_ratio_points_the_right_way():
    op = DifferentiableTopK(16, rows=2)
    op.set_importance(torch.rand(2, 16))
    with torch.no_grad():
        op.ratio.fill_(0.4)
    # a loss that rewards keeping units must push a down (positive gradient -> descent lowers a)
    (-op.soft_mask().sum()).backward()
    assert (op.ratio.grad > 0).all()
    op.ratio.grad = None
    op.soft_mask().sum().backward()
    assert (op.ratio.grad < 0).all()
    # dm/da = -lam m (1 - m)
    op.ratio.grad = None
    m = op.soft_mask()
    m[0].sum().backward()
    expected = -(op.lam * m[0] * (1 - m[0])).sum()
    assert torch.allclose(op.ratio.grad[0], expected.detach(), rtol=1e-5)


@pytest.mark.parametrize("n,scale", [(64, 1), (192, 1), (1536, 1), (30, 4), (9, 4)])
def test_masks_are_polarized(n, scale):
    op = DifferentiableTopK(n, temperature_scale=scale)
    op.set_importance(torch.rand(1, n))
    for a in (0.1, 0.33, 0.5, 0.77):
        with torch.no_grad():
            op.ratio.fill_(a)
        m = op.soft_mask()
        undecided = ((m > 0.05) & (m < 0.95)).sum().item()
        assert undecided <= 6
        # the soft mask agrees with the hard choice away from the boundary
        assert ((m > 0.5).float().sum() - op.kept_counts().float()).abs().item() <= 1


def test_shared_ratio_and_clamp():
    op = DifferentiableTopK(8, rows=4, shared_ratio=True, min_units=2)
    op.set_importance(torch.rand(4, 8))
    with torch.no_grad():
        op.ratio.fill_(0.95)
    op.clamp_()
    assert op.ratio.item() == pytest.approx(1 - 2 / 8)
    assert op.kept_counts().tolist() == [2, 2, 2, 2]
    with torch.no_grad():
        op.ratio.fill_(-0.3)
    op.clamp_()
    assert op.ratio.item() == 0.0 and op.kept_counts().tolist() == [8] * 4


def test_importance_moving_average():
    op = DifferentiableTopK(3)
    op.set_importance(torch.tensor([[1.0, 2.0, 3.0]]))
    mask, grad = torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[2.0, 2.0, 2.0]])
    op.update_importance(mask, grad)
    assert torch.allclose(op.importance, torch.tensor([[0.99 + 0.04, 1.98 + 0.01, 2.97]]))


def test_bad_arguments():
    with pytest.raises(ValueError):
        DifferentiableTopK(0)
    with pytest.raises(ValueError):
        DifferentiableTopK(4, min_units=5)
