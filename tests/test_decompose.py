"""Fits from a trained dense layer: optimal error (Van Loan-Pitsianis), exact recovery, and a
cross-check against TensorLy-Torch's BlockTT, an independent implementation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kron.layers import KronConv2d, KronLinear, fit_kronecker_sum, kron_compose, nearest_kronecker
from kron.layers.decompose import rearrange, top_singular_triplets


def tail_error(weight: torch.Tensor, a_shape, rank: int) -> float:
    """The theoretical optimum: the norm of the singular values the fit leaves out."""
    s = torch.linalg.svdvals(rearrange(weight.double(), a_shape))
    return s[rank:].norm().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a_shape,rank", [((4, 8), 1), ((4, 8), 3), ((8, 2), 5), ((2, 16), 2)])
def test_from_linear_error_is_optimal(a_shape, rank, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, dtype=dtype)
    layer = KronLinear.from_linear(linear, [a_shape] * rank)
    assert layer.weight_shape == (16, 32) and layer.a_factors[0].dtype == dtype
    err = (layer.dense_weight().double() - linear.weight.double()).norm().item()
    assert err == pytest.approx(tail_error(linear.weight, a_shape, rank), rel=1e-5)
    torch.testing.assert_close(layer.bias, linear.bias)


@pytest.mark.parametrize("a_shape,rank", [((4, 2, 1, 1), 2), ((2, 2, 2, 2), 1), ((8, 4, 3, 1), 3)])
def test_from_conv_error_is_optimal(a_shape, rank):
    torch.manual_seed(0)
    if a_shape[2] == 2:  # split the 4x4 kernel 2x2 (x) 2x2
        conv = nn.Conv2d(8, 8, 4, stride=2, padding=1, dtype=torch.float64)
    else:
        conv = nn.Conv2d(8, 8, 3, stride=2, padding=(1, 2), dilation=(2, 1), dtype=torch.float64)
    layer = KronConv2d.from_conv(conv, [a_shape] * rank)
    assert (layer.stride, layer.padding, layer.dilation) == (
        conv.stride, tuple(conv.padding), conv.dilation)
    err = (layer.dense_weight() - conv.weight).norm().item()
    assert err == pytest.approx(tail_error(conv.weight, a_shape, rank), rel=1e-5)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    ref = nn.functional.conv2d(x, layer.dense_weight(), conv.bias, conv.stride, conv.padding,
                               conv.dilation)
    torch.testing.assert_close(layer(x), ref)


def test_exact_recovery_of_kronecker_structured_weights():
    torch.manual_seed(0)
    a = torch.randn(3, 4, 2, 1, 3, dtype=torch.float64)
    b = torch.randn(3, 2, 3, 3, 1, dtype=torch.float64)
    conv = nn.Conv2d(6, 8, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(kron_compose(a, b))
    layer = KronConv2d.from_conv(conv, [(4, 2, 1, 3)] * 3)
    assert (layer.dense_weight() - conv.weight).norm() < 1e-12 * conv.weight.norm()
    linear = nn.Linear(12, 10, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(kron_compose(torch.randn(2, 5, 3, dtype=torch.float64),
                                         torch.randn(2, 2, 4, dtype=torch.float64)))
    fit = KronLinear.from_linear(linear, [(5, 3), (5, 3)])
    assert (fit.dense_weight() - linear.weight).norm() < 1e-12 * linear.weight.norm()


def test_mixed_shapes_recover_exact_sum_and_never_do_worse_than_one_group():
    torch.manual_seed(0)
    part1 = kron_compose(torch.randn(1, 4, 8, dtype=torch.float64),
                         torch.randn(1, 4, 4, dtype=torch.float64))
    part2 = kron_compose(torch.randn(1, 8, 2, dtype=torch.float64),
                         torch.randn(1, 2, 16, dtype=torch.float64))
    w = part1 + part2
    (a1, b1), (a2, b2) = fit_kronecker_sum(w, [((4, 8), 1), ((8, 2), 1)], sweeps=200)
    fit = kron_compose(a1, b1) + kron_compose(a2, b2)
    assert (fit - w).norm() < 1e-6 * w.norm()
    # on a random weight, the mixed fit is at least as good as its first group alone
    w = torch.randn(16, 32, dtype=torch.float64)
    mixed = fit_kronecker_sum(w, [((4, 8), 2), ((8, 2), 2)])
    mixed_err = (w - sum(kron_compose(a, b) for a, b in mixed)).norm().item()
    assert mixed_err <= tail_error(w, (4, 8), 2) + 1e-12
    assert mixed_err <= tail_error(w, (8, 2), 2) + 1e-12


def test_block_coordinate_descent_error_is_monotone():
    torch.manual_seed(1)
    w = torch.randn(16, 32, dtype=torch.float64)
    groups = [((4, 8), 1), ((8, 2), 2), ((2, 4), 1)]
    errors = []
    for sweeps in range(0, 6):
        fit = fit_kronecker_sum(w, groups, sweeps=sweeps)
        errors.append((w - sum(kron_compose(a, b) for a, b in fit)).norm().item())
    assert all(e2 <= e1 + 1e-12 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_rank_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="valid ranks are 1..4"):
        nearest_kronecker(torch.randn(4, 8), (2, 2), 5)


def test_agrees_with_tensorly_torch_blocktt():
    """TensorLy-Torch's BlockTT of rank (1, R, 1) is a sum of R Kronecker products, and its
    from_linear is the optimal fit: it must give our weight, and our layer on its factors must
    give its output."""
    tltorch = pytest.importorskip("tltorch")
    torch.manual_seed(0)
    linear = nn.Linear(24, 12, dtype=torch.float64)
    for rank in (1, 2, 4):
        fl = tltorch.FactorizedLinear.from_linear(
            linear, auto_tensorize=False, in_tensorized_features=(4, 6),
            out_tensorized_features=(3, 4), factorization="blocktt", rank=(1, rank, 1))
        theirs = fl.weight.to_matrix()
        ours = KronLinear.from_linear(linear, [(3, 4)] * rank, implementation="factored")
        torch.testing.assert_close(ours.dense_weight(), theirs.to(torch.float64))
        # our layer, loaded with their factors, computes their layer's output
        f0, f1 = fl.weight.factors  # (1, m1, n1, R), (R, m2, n2, 1)
        layer = KronLinear(24, 12, [(3, 4)] * rank, implementation="factored",
                           dtype=torch.float64)
        with torch.no_grad():
            layer.a_factors[0].copy_(f0[0].permute(2, 0, 1))
            layer.b_factors[0].copy_(f1[..., 0])
            layer.bias.copy_(fl.bias)
        x = torch.randn(5, 24, dtype=torch.float64)
        torch.testing.assert_close(layer(x), fl(x).to(torch.float64))


@pytest.mark.parametrize("rank", [1, 3])
def test_lanczos_path_is_as_optimal_as_full_svd(monkeypatch, rank):
    """Large rearranged matrices use ARPACK's leading triplets (forced here on a small one by
    ``full_svd_max``): the singular values, descending, and the rank-R truncation are the full
    SVD's, so the fit is still the optimum."""
    import scipy.sparse.linalg

    calls = []
    svds = scipy.sparse.linalg.svds
    monkeypatch.setattr(scipy.sparse.linalg, "svds", lambda *a, **k: calls.append(1) or svds(
        *a, **k))
    torch.manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64)
    mat = rearrange(w, (6, 8))  # 48 x 64: a full SVD by default
    u_full, s_full, vh_full = top_singular_triplets(mat, rank)
    assert calls == []
    u, s, vh = top_singular_triplets(mat, rank, full_svd_max=4)
    assert calls == [1]
    assert u.shape == (48, rank) and vh.shape == (rank, 64)
    torch.testing.assert_close(s, s_full, rtol=1e-12, atol=0)
    truncated = (u * s) @ vh
    torch.testing.assert_close(truncated, (u_full * s_full) @ vh_full, rtol=0, atol=1e-12)
    err = (mat - truncated).norm().item()
    assert err == pytest.approx(tail_error(w, (6, 8), rank), rel=1e-9)
