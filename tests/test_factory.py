"""kron.layers.factorize: every kind from scratch and from dense, budgets against hand counts,
fit errors against the Eckart-Young optimum, and one-line refusals naming the blocker."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kron.layers import FactorizationError, factorize, relative_fit_error

torch.manual_seed(0)


def dense64(layer: nn.Module) -> nn.Module:
    return layer.to(torch.float64)


def weight_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters()) - (0 if m.bias is None else m.bias.numel())


def conv() -> nn.Conv2d:
    return dense64(nn.Conv2d(12, 18, 3, padding=1))


def linear() -> nn.Linear:
    return dense64(nn.Linear(24, 36))


# full-rank settings, where a fit from dense is exact: (layer, kind, setting)
FULL = [
    (linear, "kron", {"terms": [(4, 6)] * 24}),  # rank = min(4*6, 9*4)
    (linear, "lowrank", {"rank": 24}),
    (conv, "kron", {"terms": [(3, 4, 1, 1)] * 12}),  # min(12, 6*3*9)
    (conv, "separable", {"rank": 36}),  # min(C*kh, F*kw) = min(36, 54)
    (conv, "cp", {"rank": 12 * 18 * 9 // 18}),  # numel / max dim
    (conv, "tucker", {"ranks": (12, 18)}),
]


@pytest.mark.parametrize("make,kind,setting", FULL, ids=[f"{m.__name__}-{k}" for m, k, _ in FULL])
def test_each_kind_from_scratch_and_from_dense(make, kind, setting):
    dense = make()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    scratch = factorize(dense, kind, **setting)
    fitted = factorize(dense, kind, init="dense", **setting)
    x = torch.randn(2, 24, dtype=torch.float64) if isinstance(dense, nn.Linear) else \
        torch.randn(2, 12, 7, 7, dtype=torch.float64)
    for m in (scratch, fitted):
        assert m.bias is not None and m.dense_weight().dtype == torch.float64
        ref = F.linear(x, m.dense_weight(), m.bias) if isinstance(dense, nn.Linear) else \
            F.conv2d(x, m.dense_weight(), m.bias, padding=1)
        torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)
    # scratch keeps the dense init's scale (Var 1/(3 fan_in)) and is not a fit
    assert relative_fit_error(dense, scratch) > 0.5
    # at full rank the fit is exact (float64: rounding only); the source layer is untouched
    assert relative_fit_error(dense, fitted) < 1e-10
    torch.testing.assert_close(fitted(x), dense(x), rtol=1e-9, atol=1e-9)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())


def test_dense_kind_returns_the_module():
    layer = conv()
    assert factorize(layer, "dense") is layer


# --------------------------------------------------------------------------------- budgets


def test_lowrank_budget_hand_count():
    # rank r costs r * (100 + 60); budget 0.3 * 6000 = 1800 -> r = 11 (1760), 12 costs 1920
    m = factorize(nn.Linear(100, 60), "lowrank", param_ratio=0.3)
    assert m.rank == 11 and weight_params(m) == 1760


@pytest.mark.parametrize("kind,ratio,want,params", [
    ("separable", 0.25, 8, 8 * (16 * 3 + 32 * 3)),  # 144 r <= 1152: r = 8 exactly on budget
    ("cp", 0.25, 21, 21 * (16 + 3 + 3 + 32)),  # 54 r <= 1152: 21 (1134); 22 costs 1188
    ("tucker", 0.25, (6, 12), 16 * 6 + 6 * 12 * 9 + 12 * 32),  # 1128; (6, 13) costs 1214
])
def test_conv_budgets_hand_count(kind, ratio, want, params):
    dense = nn.Conv2d(16, 32, 3)  # 4608 weights; budget 1152
    m = factorize(dense, kind, param_ratio=ratio)
    assert (m.ranks if kind == "tucker" else m.rank) == want
    assert weight_params(m) == params <= ratio * 4608


def test_separable_mac_budget_hand_count():
    # input 8x8, padding 1: each rank costs 64 * (16*3) + 64 * (32*3) = 9216 MACs; dense
    # 32*16*9*64 = 294912; 0.2 of it is 58982.4 -> rank 6 (55296), rank 7 costs 64512
    m = factorize(nn.Conv2d(16, 32, 3, padding=1), "separable", mac_ratio=0.2,
                  input_shape=(1, 16, 8, 8))
    assert m.rank == 6 and m.analytic_macs((1, 16, 8, 8)) == 6 * 9216


def test_kron_budget_takes_the_most_parameters_within_it():
    # Linear 64 -> 32 at 0.1: 204.8 weights. A (m1, n1) costs m1 n1 + (32/m1)(64/n1); by
    # hand over all divisor pairs the counts are ..., 96, 144, 264, ...: 144 is the largest
    # within budget, the next one (264) exceeds it
    m = factorize(nn.Linear(64, 32), "kron", param_ratio=0.1)
    counts = sorted({a * b + (32 // a) * (64 // b) for a in (1, 2, 4, 8, 16, 32)
                     for b in (1, 2, 4, 8, 16, 32, 64)})
    assert weight_params(m) == 144
    assert counts[counts.index(144) + 1] == 264 > 204.8


def test_kron_budget_with_rank_and_mac_budget():
    dense = nn.Conv2d(32, 64, 3, padding=1)
    shape = (1, 32, 8, 8)
    m = factorize(dense, "kron", param_ratio=0.2, mac_ratio=0.2, rank=2, input_shape=shape)
    assert len(m.terms) == 2 and m.terms[0] == m.terms[1]
    assert weight_params(m) <= 0.2 * dense.weight.numel()
    assert m.analytic_macs(shape) <= 0.2 * 64 * 32 * 9 * 64


# ---------------------------------------------------------------------- optimal fit errors


def test_lowrank_fit_error_is_eckart_young():
    dense = dense64(nn.Linear(40, 30))
    s = torch.linalg.svdvals(dense.weight.detach())
    m = factorize(dense, "lowrank", rank=7, init="dense")
    want = math.sqrt((s[7:] ** 2).sum().item()) / dense.weight.norm().item()
    assert relative_fit_error(dense, m) == pytest.approx(want, rel=1e-10)


def test_kron_single_shape_fit_error_is_eckart_young():
    dense = dense64(nn.Conv2d(8, 12, 3))
    w = dense.weight.detach()  # (F1 F2, C1 C2, 3, 3) with A (4, 4, 1, 1), B (3, 2, 3, 3)
    # rearranged: rows (f1, c1), columns (f2, c2, i, j); A (x) B is rank one there
    r = w.reshape(4, 3, 4, 2, 3, 3).permute(0, 2, 1, 3, 4, 5).reshape(16, 54)
    s = torch.linalg.svdvals(r)
    m = factorize(dense, "kron", terms=[(4, 4, 1, 1)] * 2, init="dense")
    want = math.sqrt((s[2:] ** 2).sum().item()) / w.norm().item()
    assert relative_fit_error(dense, m) == pytest.approx(want, rel=1e-10)


def test_separable_fit_error_is_eckart_young():
    dense = dense64(nn.Conv2d(6, 10, 3))
    w = dense.weight.detach()  # W[(c, i), (f, j)] has rank <= the separable rank
    s = torch.linalg.svdvals(w.permute(1, 2, 0, 3).reshape(18, 30))
    m = factorize(dense, "separable", rank=5, init="fit")
    want = math.sqrt((s[5:] ** 2).sum().item()) / w.norm().item()
    assert relative_fit_error(dense, m) == pytest.approx(want, rel=1e-10)


def test_fit_refines_mixed_kronecker_shapes():
    dense = dense64(nn.Linear(32, 32))
    terms = [(4, 8), (8, 4), (2, 2)]
    closed = relative_fit_error(dense, factorize(dense, "kron", terms=terms, init="dense"))
    refined = relative_fit_error(dense, factorize(dense, "kron", terms=terms, init="fit"))
    assert refined < closed - 1e-6  # block coordinate sweeps improve on the greedy fit


# ------------------------------------------------------------------------------- refusals


def test_budget_refusal_names_the_smallest_achievable_ratio():
    with pytest.raises(FactorizationError, match=r"^se\.fc1 Conv2d\(8->8, 1x1\): no rank-1 "
                       r"Kronecker.*blocker: budget.*smallest achievable param_ratio 0\.25"):
        factorize(nn.Conv2d(8, 8, 1), "kron", param_ratio=0.01, name="se.fc1")
    # CP rank 1 of an 8x8 1x1 kernel: 8 + 1 + 1 + 8 = 18 of 64 weights
    with pytest.raises(FactorizationError, match=r"blocker: budget.*param_ratio 0\.2812"):
        factorize(nn.Conv2d(8, 8, 1), "cp", param_ratio=0.01)


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "cp", "rank": 2, "module": nn.Linear(8, 8)}, r"valid kinds here: \['dense'"),
    ({"kind": "kron", "terms": [(5, 5, 1, 1)]}, r"blocker: shape"),
    ({"kind": "separable", "rank": 10**6}, r"valid ranks are 1\.\.24\); blocker: rank"),
    ({"kind": "kron"}, r"exactly one of 'terms'"),
    ({"kind": "kron", "terms": [(2, 2, 1, 1)], "rank": 2}, r"'rank' with 'terms' is ambiguous"),
    ({"kind": "cp", "ranks": (2, 2), "rank": 2}, r"'ranks' is Tucker's"),
    ({"kind": "lowrank", "rank": 2, "module": nn.Linear(8, 8), "implementation": "composed"},
     r"applies to kind 'kron' only"),
    ({"kind": "separable", "mac_ratio": 0.5}, r"needs the layer's input_shape"),
    ({"kind": "tucker", "param_ratio": -1}, r"param_ratio must be a number > 0"),
    ({"kind": "svd", "rank": 2}, r"kind must be one of"),
    ({"kind": "cp", "rank": 2, "init": "warm"}, r"init must be one of"),
    ({"kind": "cp", "rank": 2, "input_shape": (1, 3, 8, 8)}, r"input_shape must be"),
])
def test_refusals_are_one_line(kwargs, match):
    module = kwargs.pop("module", nn.Conv2d(8, 16, 3))
    with pytest.raises(FactorizationError, match=match) as info:
        factorize(module, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["kron", "separable", "cp", "tucker"])
def test_depthwise_is_factored_or_refused_for_groups(kind):
    """Today's layers refuse groups; once they take them, a full-rank fit must be exact."""
    dense = dense64(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    # full rank: per-group Kronecker terms (1,1,3,1) x3; for the rank kinds the largest rank
    # the class accepts (a budget that never binds), whatever a rank means per group
    full = {"terms": [(1, 1, 3, 1)] * 3} if kind == "kron" else {"param_ratio": 1e6}
    try:
        m = factorize(dense, kind, init="dense", **full)
    except FactorizationError as err:
        assert "blocker: groups=8" in str(err) and "budget" not in str(err)
        return
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), dense(x), rtol=1e-9, atol=1e-9)


def test_depthwise_budget_refusal_names_groups_not_the_budget():
    dense = nn.Conv2d(16, 16, 3, groups=16)
    try:
        factorize(dense, "kron", param_ratio=0.1, name="dw")
    except FactorizationError as err:
        # today: groups; once groups are supported, a (1,1,3,3) kernel per group costs at
        # least 3 + 3 of 9 weights: then the budget is the blocker, with that ratio
        assert ("blocker: groups=16" in str(err)) != ("param_ratio 0.6667" in str(err))
    else:
        pytest.fail("a depthwise 3x3 conv cannot reach param_ratio 0.1")


def test_depthwise_is_factored():
    # each group (1, 1, 3, 3) is a full-rank sum of three (1, 1, 3, 1) x (1, 1, 1, 3) terms
    dense = dense64(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    m = factorize(dense, "kron", terms=[(1, 1, 3, 1)] * 3, init="dense")
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), dense(x), rtol=1e-9, atol=1e-9)


def test_padding_mode_is_kept_or_named_as_the_blocker():
    dense = dense64(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"))
    try:
        m = factorize(dense, "separable", rank=12, init="dense")
    except FactorizationError as err:
        assert "blocker: padding_mode='reflect'" in str(err)
        return
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), dense(x), rtol=1e-9, atol=1e-9)


def test_same_padding_budget():
    dense = nn.Conv2d(16, 32, 3, padding="same")
    shape = (1, 16, 8, 8)
    for kind in ("kron", "separable", "cp", "tucker"):
        m = factorize(dense, kind, param_ratio=0.2, mac_ratio=0.5, input_shape=shape)
        assert weight_params(m) <= 0.2 * 4608
        assert m.analytic_macs(shape) <= 0.5 * 32 * 16 * 9 * 64
        assert m(torch.randn(shape)).shape == (1, 32, 8, 8)


def test_rank_bound_is_the_layer_classes():
    # a generous budget stops at the class's own bound: CPConv2d's numel / max dim = 100 / 5
    # for a (2, 2, 5, 5) kernel (the old surgery bound, min(C, F) * kh * kw, said 50)
    m = factorize(nn.Conv2d(2, 2, 5), "cp", param_ratio=100.0)
    assert m.rank == 20
    with pytest.raises(FactorizationError, match=r"valid ranks are 1\.\.20"):
        factorize(nn.Conv2d(2, 2, 5), "cp", rank=21)
