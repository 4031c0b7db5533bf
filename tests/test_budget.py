"""The one budget filter (``within_budget``) and the shape choice built on it (``choose_terms``),
held against costs counted by hand and by brute force written independently of kron's formulas."""

from __future__ import annotations

import itertools

import pytest
from torch import nn

from kron.layers.shapes import choose_terms, factorizations, within_budget


def _brute_linear(out_f: int, in_f: int, rank: int = 1) -> dict[tuple[int, int], tuple[int, int]]:
    """A shape -> (params, MACs per row) of every non-trivial single-shape Kronecker linear:
    params ``R (m1 n1 + m2 n2)``; MACs the cheaper of the two contraction orders of
    ``A X B^T`` with ``X (n1, n2)``: B first ``R n1 n2 m2 + R m1 n1 m2``, A first
    ``R m1 n1 n2 + R m1 n2 m2``."""
    out = {}
    for m1, n1 in itertools.product(range(1, out_f + 1), range(1, in_f + 1)):
        if out_f % m1 or in_f % n1:
            continue
        m2, n2 = out_f // m1, in_f // n1
        if m1 * n1 == 1 or m2 * n2 == 1 or rank > min(m1 * n1, m2 * n2):
            continue
        b_first = n1 * n2 * m2 + m1 * n1 * m2
        a_first = m1 * n1 * n2 + m1 * n2 * m2
        out[(m1, n1)] = (rank * (m1 * n1 + m2 * n2), rank * min(a_first, b_first))
    return out


def test_factorizations_of_a_small_linear_equal_a_hand_count():
    fc = nn.Linear(8, 4)
    got = {f.a_shape: f for f in factorizations(fc)}
    assert set(got) == {(1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (2, 4), (2, 8), (4, 1), (4, 2),
                        (4, 4)}
    # by hand: A (2, 2), B (2, 4): 4 + 8 = 12 params of 32; B first 2*4*2 + 2*2*2 = 24 MACs
    assert (got[(2, 2)].params, got[(2, 2)].macs) == (12, 24)
    assert got[(2, 2)].param_ratio == 12 / 32 and got[(2, 2)].mac_ratio == 24 / 32
    assert got[(4, 4)].params == 18 and got[(1, 8)].params == 12
    brute = _brute_linear(4, 8)
    assert {a: (f.params, f.macs) for a, f in got.items()} == brute


@pytest.mark.parametrize("rank", [1, 2])
def test_within_budget_keeps_exactly_the_shapes_at_or_under_both_ratios(rank):
    fc = nn.Linear(32, 16)
    brute = _brute_linear(16, 32, rank)
    dense = 16 * 32
    for p_ratio, m_ratio in [(0.1, None), (0.25, None), (None, 0.3), (0.2, 0.25), (1.0, 1.0)]:
        kept = within_budget(fc, rank=rank, param_ratio=p_ratio, mac_ratio=m_ratio)
        want = {a for a, (p, m) in brute.items()
                if (p_ratio is None or p / dense <= p_ratio)
                and (m_ratio is None or m / dense <= m_ratio)}
        assert {f.a_shape for f in kept} == want, (p_ratio, m_ratio)
        # sorted by parameters
        assert [f.params for f in kept] == sorted(f.params for f in kept)


def test_within_budget_bound_is_inclusive():
    fc = nn.Linear(8, 4)
    at = within_budget(fc, param_ratio=12 / 32)
    assert {f.a_shape for f in at} == {(1, 4), (1, 8), (2, 2), (2, 4), (4, 1), (4, 2)}
    assert within_budget(fc, param_ratio=12 / 32 - 1e-9) == []
    assert {f.a_shape for f in within_budget(fc, mac_ratio=24 / 32)} >= {(2, 2)}
    assert (2, 2) not in {f.a_shape for f in within_budget(fc, mac_ratio=24 / 32 - 1e-9)}


def test_within_budget_trivial_shapes_only_when_asked():
    fc = nn.Linear(8, 4)
    plain = {f.a_shape for f in within_budget(fc, param_ratio=2.0)}
    every = {f.a_shape for f in within_budget(fc, param_ratio=2.0, include_trivial=True)}
    assert every - plain == {(1, 1), (4, 8)}  # A all ones or B all ones: 1 + 32 params


def test_within_budget_conv_mac_budget_uses_the_input_size():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    kept = within_budget(conv, (8, 8), mac_ratio=0.2)
    assert kept and all(f.mac_ratio <= 0.2 for f in kept)
    # A (4, 4, 1, 1), B (4, 4, 3, 3) on 8x8: B stage 64 * 4 * 4 * 4 * 9 = 36,864 MACs, A stage
    # 64 * 4 * 4 * 4 = 4,096; dense 64 * 16 * 16 * 9 = 147,456
    f = next(f for f in factorizations(conv, (8, 8)) if f.a_shape == (4, 4, 1, 1))
    assert f.macs == 36_864 + 4_096 and f.mac_ratio == (36_864 + 4_096) / 147_456


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs a budget"),
    ({"param_ratio": 0.0}, "param_ratio must be > 0"),
    ({"mac_ratio": -1.0}, "mac_ratio must be > 0"),
])
def test_within_budget_rejects_bad_budgets(kwargs, message):
    with pytest.raises(ValueError, match=message):
        within_budget(nn.Linear(8, 4), **kwargs)


def test_conv_mac_budget_without_input_size_is_an_error():
    with pytest.raises(ValueError, match=r"input_hw"):
        within_budget(nn.Conv2d(8, 8, 3), mac_ratio=0.5)
    assert within_budget(nn.Linear(8, 4), mac_ratio=1.0)  # linear MACs need no input size


def test_choose_terms_takes_the_largest_fit_and_names_the_smallest_achievable_ratio():
    fc = nn.Linear(32, 16)
    brute = _brute_linear(16, 32)
    budget = 0.2
    best_params = max(p for p, _ in brute.values() if p / 512 <= budget)
    terms = choose_terms(fc, param_ratio=budget)
    assert len(terms) == 1 and brute[terms[0]][0] == best_params
    # 0.2 of 512 admits the 72-parameter shapes (1 (x) 64 elements split 8 / 64 every way);
    # all are equally balanced, so the first in shape order wins
    assert terms == [(1, 8)]
    # at rank 2 a 72-parameter shape costs 144 > 102.4: the 48-parameter shapes (96) win
    assert choose_terms(fc, param_ratio=budget, rank=2) == [(1, 16), (1, 16)]
    smallest = min(p for p, _ in brute.values()) / 512
    with pytest.raises(ValueError, match=f"smallest achievable: param_ratio={smallest:.4g}"):
        choose_terms(fc, param_ratio=smallest * 0.99)


def _brute_square_channels_conv(f: int, c: int, k: int, budget: float
                                ) -> dict[tuple[int, ...], int]:
    """A shape -> params of every ``square_channels`` candidate of a k x k conv within a
    parameter budget, counted by hand: A ``(f1, c1, 1, 1)``, B ``(f/f1, c/c1, k, k)``, each
    channel split at least 2 on both factors."""
    out = {}
    for f1, c1 in itertools.product(range(2, f // 2 + 1), range(2, c // 2 + 1)):
        if f % f1 or c % c1:
            continue
        params = f1 * c1 + (f // f1) * (c // c1) * k * k
        if params <= budget * f * c * k * k:
            out[(f1, c1, 1, 1)] = params
    return out


def test_square_channels_rule_takes_the_largest_channel_split_fit():
    conv = nn.Conv2d(32, 64, 3, padding=1)  # F 64, C 32
    budget = 0.1
    brute = _brute_square_channels_conv(64, 32, 3, budget)
    most = max(brute.values())
    terms = choose_terms(conv, param_ratio=budget, input_hw=(8, 8), shape_rule="square_channels")
    assert len(terms) == 1 and brute[terms[0]] == most
    # the tie among the largest fits (f1 * c1 = 16) goes to the squarest channel blocks: A 4x4
    # (B 16x8) beats A 2x8 (B 32x4) and A 8x2 (B 8x16)
    assert [s for s, p in brute.items() if p == most] == [(2, 8, 1, 1), (4, 4, 1, 1),
                                                         (8, 2, 1, 1)]
    assert terms == [(4, 4, 1, 1)]
    # the default rule takes a shape that splits the kernel, which this rule never does
    assert choose_terms(conv, param_ratio=budget, input_hw=(8, 8))[0][2:] != (1, 1)
    # surgery's budget search (the factory) and choose_terms agree
    from kron.layers import factorize

    layer = factorize(conv, "kron", param_ratio=budget, shape_rule="square_channels",
                      input_shape=(1, 32, 8, 8))
    assert [tuple(t) for t in layer.terms] == terms


def test_shape_rule_refusals_name_the_problem():
    from kron.layers import FactorizationError, factorize

    conv = nn.Conv2d(64, 32, 3)
    with pytest.raises(FactorizationError, match=r"shape_rule must be one of \['most_params'"):
        choose_terms(conv, param_ratio=0.1, shape_rule="squares")
    with pytest.raises(FactorizationError, match="shape_rule.*kind 'lowrank' has none"):
        factorize(nn.Linear(8, 8), "lowrank", param_ratio=0.5, shape_rule="most_params")
    with pytest.raises(FactorizationError, match="goes with a 'param_ratio'"):
        factorize(conv, "kron", terms=[(2, 2, 1, 1)], shape_rule="square_channels")
    # a layer with a prime channel count has no channel split both ways
    with pytest.raises(FactorizationError, match="allowed by shape_rule=square_channels"):
        factorize(nn.Conv2d(7, 8, 3), "kron", param_ratio=0.5, shape_rule="square_channels",
                  input_shape=(1, 7, 8, 8))
