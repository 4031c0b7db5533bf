"""Term-shape enumeration and choice; parameter and MAC counts against independent truths
(FlopCounterMode on the executed forward, numel of the built parameters, hand counts)."""

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
from kron.measure import analytic_macs, count_macs, count_params


def test_term_shapes_are_exactly_the_divisor_grid():
    shapes = kron_term_shapes(nn.Linear(12, 6))
    assert len(shapes) == 4 * 6  # divisors of 6 times divisors of 12
    assert (2, 3) in shapes and (6, 12) in shapes and (1, 1) in shapes
    conv_shapes = kron_term_shapes(nn.Conv2d(8, 4, (4, 3)))
    assert len(conv_shapes) == 3 * 4 * 3 * 2
    for s in conv_shapes:
        KronConv2d(8, 4, (4, 3), [s])  # every enumerated shape builds


def test_factorizations_costs_match_the_built_layers():
    """Each candidate's closed-form cost equals what the built layer holds and runs."""
    conv = nn.Conv2d(8, 4, 3, stride=2, padding=1)
    dense_macs = 4 * 8 * 9 * 6 * 5  # one 12x10 image, stride 2: 6x5 outputs
    for f in factorizations(conv, input_hw=(12, 10), rank=2):
        layer = KronConv2d.from_conv(conv, [f.a_shape] * 2, implementation="factored")
        assert f.params == count_params(layer) - 4  # factors only
        assert f.macs == count_macs(layer, (1, 8, 12, 10))
        assert f.param_ratio == pytest.approx(f.params / (4 * 8 * 9))
        assert f.mac_ratio == pytest.approx(f.macs / dense_macs)
    # trivial shapes (A or B all ones) are excluded unless asked for
    assert all(math.prod(f.a_shape) > 1 and math.prod(f.b_shape) > 1 for f in
               factorizations(conv, input_hw=(12, 10)))
    assert len(factorizations(conv, include_trivial=True)) == len(kron_term_shapes(conv))


def test_choose_terms_meets_the_budget_with_most_capacity():
    linear = nn.Linear(1024, 512)
    terms = choose_terms(linear, param_ratio=0.01, rank=2)
    assert len(terms) == 2 and terms[0] == terms[1]
    layer = KronLinear(1024, 512, terms, bias=False)
    # by hand: |A| |B| = 512 * 1024 = 2^19, and 2 (|A| + |B|) <= 0.01 * 2^19 = 5242.88 allows
    # |A| + |B| = 2^8 + 2^11 = 2304 at most (2^9 + 2^10 = 1536 holds fewer, 2^7 + 2^12 too many)
    assert count_params(layer) == 2 * 2304
    a_size = math.prod(terms[0])
    assert sorted([a_size, 512 * 1024 // a_size]) == [256, 2048]
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
    yield KronLinear(64, 32, [(32, 64)], implementation="composed"), (7, 64)
    yield KronConv2d(16, 8, 3, [(4, 4, 1, 1), (4, 4, 1, 1)], stride=2, padding=1,
                     implementation="factored"), (2, 16, 11, 9)
    yield KronConv2d(16, 8, 4, [(2, 4, 2, 2), (4, 2, 1, 4)], stride=(2, 1), padding=(1, 2),
                     dilation=(1, 2), implementation="factored"), (2, 16, 13, 12)
    yield KronConv2d(16, 8, 4, [(2, 4, 2, 2)], implementation="composed"), (2, 16, 13, 12)
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
    ran = layer.rule_implementation((32, 256), "cpu", training=False)
    assert counted == layer.analytic_macs((32, 256), implementation=ran)


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


def test_count_params_trainable_only_skips_frozen_parameters():
    frozen, head = nn.Linear(4, 4), nn.Linear(4, 2)  # 20 and 10 parameters
    frozen.requires_grad_(False)
    model = nn.Sequential(frozen, head)
    assert count_params(model) == 30
    assert count_params(model, trainable_only=True) == 10


def test_analytic_macs_rejects_unknown_matmul_layers():
    class Bilinear(nn.Module):  # a leaf with a weight matrix and no formula
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.weight

    with pytest.raises(ValueError, match="no MAC formula for Bilinear"):
        analytic_macs(nn.Sequential(nn.Linear(4, 4), Bilinear()), (2, 4))


def test_mac_count_refers_to_the_implementation_that_runs(monkeypatch):
    # KronLinear 16 -> 16 with A (4, 4), B (4, 4): factored 2 * 4 * 4 * 4 = 128 MACs per row
    # (either order), dense 256
    layer = KronLinear(16, 16, [(4, 4)], implementation="auto")
    assert layer.analytic_macs((3, 16)) == 3 * 128  # auto, no plan: the factored cost
    # implementation="auto" counts what a forward would run, with no forward run: this tiny
    # input is overhead-bound, so the cost model runs (and counts) dense
    assert layer.rule_implementation((3, 16), "cpu", training=False) == "composed"
    assert layer.analytic_macs((3, 16), implementation="auto") == 3 * 256
    layer.planned_implementation = "composed"
    assert layer.analytic_macs((3, 16)) == 3 * 256  # a plan counts before the first forward
    assert layer.analytic_macs((3, 16), implementation="factored") == 3 * 128
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU triton layers need the interpreter
    triton = KronLinear(16, 16, [(4, 4)], implementation="triton")
    assert triton.analytic_macs((1, 16)) == 128  # the fused kernel does the factored MACs
    dense = KronLinear(16, 16, [(4, 4)], implementation="composed")
    assert dense.analytic_macs((2, 16)) == 512
