"""The argument-space matrix of the low-rank layers (issue 16): every value of every argument
of ``nn.Conv2d`` / ``nn.Linear`` at least once and every pair of values together, built here as
a greedy pairwise covering set; for each case the layer's forward and backward equal, in
float64, the torch layer with the same arguments holding ``dense_weight()``, its MAC count
equals FlopCounterMode's, it builds on ``device='meta'``, and ``from_conv`` / ``from_linear``
at ``max_rank`` reproduce the dense layer."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kron.layers.lowrank import CPConv2d, LowRankLinear, SeparableConv2d, TuckerConv2d

F64 = torch.float64
# the torch reference itself warns that it copies the input for an even kernel's 'same' padding
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
# float64 sums of at most a few hundred O(1) products in a different order than torch's
# reference: rounding differences stay below ~1e-13 relative, far inside these bounds.
EXACT = dict(rtol=1e-10, atol=1e-12)

CONV_VALUES: dict[str, list] = {
    "kernel_size": [1, 3, (3, 2), (2, 4)],  # (2, 4): even, so 'same' pads asymmetrically
    "stride": [1, 2, (1, 2)],
    "padding": [0, 1, (2, 1), "same", "valid"],
    "dilation": [1, 2, (2, 1)],
    "groups": ["1", "2", "depthwise", "depthwise x2"],
    "padding_mode": ["zeros", "reflect", "replicate", "circular"],
    "bias": [True, False],
    "batch": [2, None],  # None: an unbatched (C, H, W) input
    "rank": ["one", "mid", "max"],
}
# (in_channels, out_channels, groups) of each ``groups`` value
CHANNELS = {"1": (3, 5, 1), "2": (4, 6, 2), "depthwise": (4, 4, 4), "depthwise x2": (3, 6, 3)}
HW = (7, 9)  # larger than every pad, so reflect padding is defined everywhere

LINEAR_VALUES: dict[str, list] = {
    "features": [(6, 4), (3, 7), (1, 5)],
    "lead": [(), (5,), (2, 3), (2, 1, 3)],  # () is a 1-D input
    "bias": [True, False],
    "rank": ["one", "mid", "max"],
}
CONV_CLASSES = {"separable": SeparableConv2d, "cp": CPConv2d, "tucker": TuckerConv2d}


def conv_valid(case: dict) -> bool:
    """nn.Conv2d's one constraint between these values: 'same' needs stride 1."""
    return not (case.get("padding") == "same" and case.get("stride", 1) not in (1, (1, 1)))


def pairwise(values: dict[str, list], valid=lambda case: True) -> list[dict]:
    """A covering set: every valid pair of values of two arguments is in some case. Greedy and
    deterministic: start from the first uncovered pair, give every other argument the value
    that covers most uncovered pairs."""
    names = list(values)

    def pairs(case: dict) -> set:
        return {(a, repr(case[a]), b, repr(case[b]))
                for a, b in itertools.combinations(names, 2) if a in case and b in case}

    uncovered = {p for a, b in itertools.combinations(names, 2)
                 for va in values[a] for vb in values[b] if valid({a: va, b: vb})
                 for p in pairs({a: va, b: vb})}
    by_repr = {(name, repr(v)): v for name in names for v in values[name]}
    cases = []
    while uncovered:
        a, va, b, vb = min(uncovered)
        case = {a: by_repr[a, va], b: by_repr[b, vb]}
        for name in names:
            if name not in case:
                options = [v for v in values[name] if valid({**case, name: v})]
                case[name] = max(options, key=lambda v: len(pairs({**case, name: v}) & uncovered))
        cases.append({name: case[name] for name in names})
        uncovered -= pairs(case)
    return cases


CONV_CASES = pairwise(CONV_VALUES, conv_valid) + [  # 'same' padding of an even kernel is
    # asymmetric (one more row/column at the bottom/right), in every mode and groups setting
    dict(kernel_size=(2, 4), stride=1, padding="same", dilation=1, groups=groups,
         padding_mode=mode, bias=True, batch=2, rank="mid")
    for mode, groups in zip(CONV_VALUES["padding_mode"], CONV_VALUES["groups"], strict=True)]
LINEAR_CASES = pairwise(LINEAR_VALUES)


def test_the_matrix_covers_every_value_and_every_valid_pair():
    for values, cases, valid in ((CONV_VALUES, CONV_CASES, conv_valid),
                                 (LINEAR_VALUES, LINEAR_CASES, lambda case: True)):
        assert all(valid(case) for case in cases)
        for (a, va_list), (b, vb_list) in itertools.combinations(values.items(), 2):
            for va, vb in itertools.product(va_list, vb_list):
                hit = any(c[a] == va and c[b] == vb for c in cases)
                assert hit == valid({a: va, b: vb}), (a, va, b, vb)
    assert len(CONV_CASES) < 40  # the full product would be 69120


def conv_kwargs(case: dict) -> dict:
    c, f, g = CHANNELS[case["groups"]]
    return dict(in_channels=c, out_channels=f, kernel_size=case["kernel_size"],
                stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                groups=g, padding_mode=case["padding_mode"], bias=case["bias"])


def rank_for(cls, which: str, top):
    """``rank`` (Tucker: ``ranks``) keyword of size ``which`` below the class's ``top``."""
    def pick(m: int) -> int:
        return {"one": 1, "mid": max(1, m // 2), "max": m}[which]

    if cls is TuckerConv2d:
        return {"ranks": (pick(top.input_rank), pick(top.output_rank))}
    return {"rank": pick(top)}


def build_conv(kind: str, case: dict, device=None):
    cls, kw = CONV_CLASSES[kind], conv_kwargs(case)
    top = cls.max_rank(kw["in_channels"], kw["out_channels"], kw["kernel_size"], kw["groups"])
    return cls(**kw, **rank_for(cls, case["rank"], top), dtype=F64, device=device)


def conv_input(case: dict, seed: int) -> torch.Tensor:
    c = CHANNELS[case["groups"]][0]
    shape = (c, *HW) if case["batch"] is None else (case["batch"], c, *HW)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def grads(layer: nn.Module, x: torch.Tensor, run) -> dict[str, torch.Tensor]:
    """``run(x)`` and the gradients of ``<run(x), g>`` wrt ``x`` and ``layer``'s parameters."""
    x = x.detach().clone().requires_grad_()
    out = run(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    names, params = zip(*layer.named_parameters(), strict=True)
    got = torch.autograd.grad((out * g).sum(), (x, *params))
    return {"out": out.detach(), "input": got[0], **dict(zip(names, got[1:], strict=True))}


def through_torch_layer(layer: nn.Module, torch_layer: nn.Module):
    """The torch layer's forward with ``layer``'s composed weight and bias (differentiable
    back to ``layer``'s factors)."""
    weights = {"weight": layer.dense_weight()}
    if layer.bias is not None:
        weights["bias"] = layer.bias
    return lambda x: torch.func.functional_call(torch_layer, weights, (x,))


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key, **EXACT)


def flop_counter_macs(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def param_shapes(module: nn.Module) -> dict:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


CONV_IDS = [f"{kind}-{i:02d}" for kind in CONV_CLASSES for i in range(len(CONV_CASES))]
CONV_PARAMS = [(kind, i) for kind in CONV_CLASSES for i in range(len(CONV_CASES))]


@pytest.mark.parametrize("kind,index", CONV_PARAMS, ids=CONV_IDS)
def test_conv_equals_the_torch_layer(kind, index):
    case = CONV_CASES[index]
    torch.manual_seed(index)
    layer, x = build_conv(kind, case), conv_input(case, index)
    kw = conv_kwargs(case)
    torch_layer = nn.Conv2d(**kw, dtype=F64)
    assert layer.dense_weight().shape == torch_layer.weight.shape
    assert_same(grads(layer, x, layer), grads(layer, x, through_torch_layer(layer, torch_layer)))
    assert layer.analytic_macs(tuple(x.shape)) == flop_counter_macs(layer, x)
    on_meta = build_conv(kind, case, device="meta")
    assert param_shapes(on_meta) == param_shapes(layer)
    assert on_meta.analytic_macs(tuple(x.shape)) == layer.analytic_macs(tuple(x.shape))


@pytest.mark.parametrize("kind,index", CONV_PARAMS, ids=CONV_IDS)
def test_conv_from_conv_is_exact_at_max_rank(kind, index):
    case = CONV_CASES[index]
    torch.manual_seed(100 + index)
    cls, kw = CONV_CLASSES[kind], conv_kwargs(case)
    dense = nn.Conv2d(**kw, dtype=F64)
    layer = cls.from_conv(dense, **rank_for(cls, "max", cls.max_rank(
        kw["in_channels"], kw["out_channels"], kw["kernel_size"], kw["groups"])))
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                 "groups", "padding_mode"):
        assert getattr(layer, name) == getattr(dense, name), name
    assert (layer.bias is None) == (dense.bias is None)
    assert all(p.dtype == F64 for p in layer.parameters())
    torch.testing.assert_close(layer.dense_weight(), dense.weight, **EXACT)
    x = conv_input(case, index)
    torch.testing.assert_close(layer(x), dense(x), **EXACT)


def build_linear(case: dict, device=None) -> LowRankLinear:
    n, m = case["features"]
    rank = rank_for(LowRankLinear, case["rank"], LowRankLinear.max_rank(n, m))
    return LowRankLinear(n, m, **rank, bias=case["bias"], dtype=F64, device=device)


@pytest.mark.parametrize("index", range(len(LINEAR_CASES)))
def test_linear_equals_the_torch_layer(index):
    case = LINEAR_CASES[index]
    torch.manual_seed(index)
    layer, (n, m) = build_linear(case), case["features"]
    x = torch.randn(*case["lead"], n, dtype=F64)
    torch_layer = nn.Linear(n, m, bias=case["bias"], dtype=F64)
    assert_same(grads(layer, x, layer), grads(layer, x, through_torch_layer(layer, torch_layer)))
    assert layer.analytic_macs(tuple(x.shape)) == flop_counter_macs(layer, x)
    on_meta = build_linear(case, device="meta")
    assert param_shapes(on_meta) == param_shapes(layer)
    assert on_meta.analytic_macs(tuple(x.shape)) == layer.analytic_macs(tuple(x.shape))
    dense = nn.Linear(n, m, bias=case["bias"], dtype=F64)
    full = LowRankLinear.from_linear(dense, LowRankLinear.max_rank(n, m))
    torch.testing.assert_close(full.dense_weight(), dense.weight, **EXACT)
    torch.testing.assert_close(full(x), dense(x), **EXACT)
