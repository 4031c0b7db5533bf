"""Term-shape enumeration and choice; parameter and MAC counts (analytic == FlopCounterMode)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kron.layers import (
    CPConv2d,
    KronConv2d,
    KronLinear,
    LowRankLinear,
    SeparableConv2d,
    TuckerConv2d,
    choose_terms,
    factorizations,
    kron_term_shapes,
)
from kron.measure import analytic_macs, count_macs, count_params, measure_latency, speedup


def test_term_shapes_are_exactly_the_divisor_grid():
    shapes = kron_term_shapes(nn.Linear(12, 6))
    assert len(shapes) == 4 * 6  # divisors of 6 times divisors of 12
    assert (2, 3) in shapes and (6, 12) in shapes and (1, 1) in shapes
    conv_shapes = kron_term_shapes(nn.Conv2d(8, 4, (4, 3)))
    assert len(conv_shapes) == 3 * 4 * 3 * 2
    for s in conv_shapes:
        KronConv2d(8, 4, (4, 3), [s])  # every enumerated shape builds


def test_factorizations_costs_match_the_built_layers():
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    for f in factorizations(conv, input_hw=(12, 10), rank=2):
        layer = KronConv2d.from_conv(conv, [f.a_shape] * 2, implementation="factored")
        assert f.params == count_params(layer) - 8  # factors only
        assert f.macs == layer.analytic_macs((1, 16, 12, 10))
        assert f.param_ratio == pytest.approx(f.params / (8 * 16 * 9))
    # trivial shapes (A or B all ones) are excluded unless asked for
    assert all(math.prod(f.a_shape) > 1 and math.prod(f.b_shape) > 1 for f in
               factorizations(conv, input_hw=(12, 10)))
    assert len(factorizations(conv, include_trivial=True)) == len(kron_term_shapes(conv))


def test_choose_terms_meets_the_budget_with_most_capacity():
    linear = nn.Linear(1024, 512)
    terms = choose_terms(linear, param_ratio=0.01, rank=2)
    assert len(terms) == 2 and terms[0] == terms[1]
    layer = KronLinear(1024, 512, terms, bias=False)
    ratio = count_params(layer) / (1024 * 512)
    assert ratio <= 0.01
    # no other rank-2 shape fits the budget with more parameters
    best = max(f.params for f in factorizations(linear, rank=2) if f.param_ratio <= 0.01)
    assert count_params(layer) == best
    conv = nn.Conv2d(64, 64, 3, padding=1)
    terms = choose_terms(conv, mac_ratio=0.2, input_hw=(16, 16))
    layer = KronConv2d.from_conv(conv, terms, implementation="factored")
    dense_macs = count_macs(conv, (1, 64, 16, 16))
    assert count_macs(layer, (1, 64, 16, 16)) <= 0.2 * dense_macs


def test_choose_terms_impossible_budget_says_what_is_achievable():
    with pytest.raises(ValueError, match="smallest achievable: param_ratio="):
        choose_terms(nn.Linear(4, 4), param_ratio=1e-4)


def _layers():
    yield KronLinear(64, 32, [(4, 8), (4, 8), (8, 2)], implementation="factored"), (3, 5, 64)
    yield KronLinear(64, 32, [(32, 64)], implementation="dense"), (7, 64)
    yield KronConv2d(16, 8, 3, [(4, 4, 1, 1), (4, 4, 1, 1)], stride=2, padding=1,
                     implementation="factored"), (2, 16, 11, 9)
    yield KronConv2d(16, 8, 4, [(2, 4, 2, 2), (4, 2, 1, 4)], stride=(2, 1), padding=(1, 2),
                     dilation=(1, 2), implementation="factored"), (2, 16, 13, 12)
    yield KronConv2d(16, 8, 4, [(2, 4, 2, 2)], implementation="dense"), (2, 16, 13, 12)
    yield LowRankLinear(64, 32, 5), (4, 64)
    yield SeparableConv2d(16, 8, 3, 4, stride=2, padding=1), (2, 16, 11, 9)
    yield CPConv2d(16, 8, 3, 6, padding=1), (2, 16, 11, 9)
    yield TuckerConv2d(16, 8, 3, (4, 6), dilation=2), (2, 16, 11, 9)
    yield nn.Linear(64, 32), (4, 64)
    yield nn.Conv2d(16, 8, 3, stride=2, padding=1), (2, 16, 11, 9)


@pytest.mark.parametrize("layer,shape", list(_layers()), ids=lambda v: type(v).__name__)
def test_analytic_macs_equal_flop_counter(layer, shape):
    assert analytic_macs(layer, shape) == count_macs(layer, shape)


def test_auto_layers_count_what_they_ran():
    layer = KronLinear(256, 256, [(16, 16)], implementation="auto")
    counted = count_macs(layer, (32, 256))
    assert counted == layer.analytic_macs((32, 256))
    assert counted == layer.analytic_macs((32, 256), implementation=layer.last_implementation)


def test_model_level_counts():
    model = nn.Sequential(
        KronConv2d(3, 16, 3, [(4, 1, 1, 1)], padding=1, implementation="factored"),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        SeparableConv2d(16, 16, 3, 4, padding=1),
        nn.Flatten(),
        KronLinear(16 * 8 * 8, 10, [(2, 32)], implementation="factored"),
    )
    shape = (2, 3, 16, 16)
    assert analytic_macs(model, shape) == count_macs(model, shape)
    expected = (4 + 4 * 3 * 9 + 16) + 2 * 16 + (4 * 16 * 3 + 16 * 4 * 3 + 16) + (64 + 5 * 32 + 10)
    assert count_params(model) == expected


def test_count_params_counts_shared_parameters_once():
    lin = nn.Linear(4, 4)
    assert count_params(nn.Sequential(lin, lin)) == 20


def test_measure_latency_and_speedup():
    torch.manual_seed(0)
    dense = nn.Linear(256, 256)
    kron = KronLinear.from_linear(dense, [(16, 16)], implementation="factored")
    times = measure_latency({"kron": kron, "dense": dense}, torch.randn(64, 256), repeats=3)
    assert set(times) == {"kron", "dense"} and all(t > 0 for t in times.values())
    assert speedup(times["kron"], times["dense"]) == times["dense"] / times["kron"]
    assert kron.training and dense.training  # modes restored


def test_analytic_macs_rejects_unknown_matmul_layers():
    class Bilinear(nn.Module):  # a leaf with a weight matrix and no formula
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.weight

    with pytest.raises(ValueError, match="no MAC formula for Bilinear"):
        analytic_macs(nn.Sequential(nn.Linear(4, 4), Bilinear()), (2, 4))
