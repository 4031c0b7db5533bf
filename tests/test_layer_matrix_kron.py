"""The argument space of nn.Conv2d and nn.Linear against KronConv2d and KronLinear.

Every case runs the Kronecker layer forward and backward in float64 and compares output and
gradients (input and every factor) with the torch layer of the same arguments holding the
composed weight (``torch.func.functional_call`` with ``dense_weight()``, so the reference's
gradients reach the factors through the composition); then the no-grad forward (the CPU
inference paths with their reused buffers). Conv cases form a pairwise covering array built
here (every value of each argument at least once, every pair of values of two arguments in
some case, impossible pairs like ``padding='same'`` with a stride left out); linear cases are
the full product. float64 and these sizes: a handful of products of length <= 48, so 1e-10 is
far above rounding and far below any indexing error.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call

from kron.layers import KronConv2d, KronLinear

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
C_IN, C_OUT, HW = 4, 8, (7, 8)

CONV_SPACE: dict[str, list] = {
    "kernel_size": [1, 3, (3, 4), (2, 2)],
    "stride": [1, 2, (1, 2)],
    "padding": [0, 1, (1, 2), "same", "valid"],
    "dilation": [1, 2, (2, 1)],
    "groups": [1, 2, 4],
    "bias": [True, False],
    "padding_mode": ["zeros", "reflect", "replicate", "circular"],
    "implementation": ["auto", "factored", "composed"],
    "unbatched": [False, True],
    "terms": ["a_out", "a_in", "a_space", "mixed"],
}


def valid(case: dict) -> bool:
    """Whether a (partial) case is one nn.Conv2d accepts: 'same' needs stride 1."""
    return not (case.get("padding") == "same" and case.get("stride", 1) != 1)


def pairwise(space: dict[str, list]) -> list[dict]:
    """A greedy pairwise covering array: cases until every valid pair of values of two
    arguments appears in one (deterministic: first uncovered pair, then the value covering
    most uncovered pairs, ties to the earlier value)."""
    names = list(space)
    uncovered = {((a, i), (b, j)) for a, b in itertools.combinations(names, 2)
                 for i in range(len(space[a])) for j in range(len(space[b]))
                 if valid({a: space[a][i], b: space[b][j]})}
    cases = []
    while uncovered:
        (a, i), (b, j) = min(uncovered)
        chosen = {a: i, b: j}
        for name in names:
            if name in chosen:
                continue

            def gain(k: int, name=name, chosen=chosen, uncovered=uncovered) -> int:
                return sum(((n, chosen[n]), (name, k)) in uncovered
                           or ((name, k), (n, chosen[n])) in uncovered for n in chosen)

            options = [k for k in range(len(space[name]))
                       if valid({**{n: space[n][v] for n, v in chosen.items()},
                                 name: space[name][k]})]
            chosen[name] = max(options, key=lambda k: (gain(k), -k))
        chosen = dict(sorted(chosen.items(), key=lambda kv: names.index(kv[0])))
        picked = list(chosen.items())
        uncovered -= {(p, q) for p, q in itertools.combinations(picked, 2)}
        cases.append({n: space[n][k] for n, k in chosen.items()})
    return cases


def conv_terms(kind: str, block: tuple[int, int, int, int]) -> list[tuple[int, ...]]:
    """A shapes of one kind for a block ``(F/groups, C/groups, kh, kw)``: A over the output
    channels (pointwise), over the input channels (pointwise), over the kernel's rows
    (spatial when kh > 1), and a mix of shapes with a rank-2 group."""
    fb, cb, kh, _ = block
    return {"a_out": [(fb, 1, 1, 1)], "a_in": [(1, cb, 1, 1)], "a_space": [(1, 1, kh, 1)],
            "mixed": [(fb, 1, 1, 1), (1, 1, kh, 1), (1, 1, kh, 1)]}[kind]


def check(layer: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """Forward and backward of ``layer`` equal ``reference`` holding the composed weight."""
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    params = [x1, *layer.parameters()]
    y = layer(x1)
    ref_params = {"weight": layer.dense_weight()}
    if layer.bias is not None:
        ref_params["bias"] = layer.bias
    want = functional_call(reference, ref_params, (x2,))
    assert y.shape == want.shape
    torch.testing.assert_close(y, want, **TOL)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, params, g)
    expected = torch.autograd.grad(want, [x2, *layer.parameters()], g)
    for name, a, b in zip(["input", *(n for n, _ in layer.named_parameters())], got, expected):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad {name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want.detach(), **TOL)
        torch.testing.assert_close(layer(x), want.detach(), **TOL)  # the reused buffers


CONV_CASES = pairwise(CONV_SPACE)


def test_the_conv_matrix_covers_every_valid_pair_and_value():
    for a, b in itertools.combinations(CONV_SPACE, 2):
        for u, v in itertools.product(CONV_SPACE[a], CONV_SPACE[b]):
            if valid({a: u, b: v}):
                assert any(c[a] == u and c[b] == v for c in CONV_CASES), (a, u, b, v)
    assert all(valid(c) for c in CONV_CASES)
    assert len(CONV_CASES) < 40


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_kron_conv_matches_nn_conv2d(case):
    torch.manual_seed(0)
    case = dict(case)
    kind, unbatched = case.pop("terms"), case.pop("unbatched")
    impl, bias = case.pop("implementation"), case.pop("bias")
    reference = nn.Conv2d(C_IN, C_OUT, bias=bias, dtype=F64, **case)
    block = (C_OUT // case["groups"], *reference.weight.shape[1:])
    groups, mode = case.pop("groups"), case.pop("padding_mode")
    layer = KronConv2d(C_IN, C_OUT, terms=conv_terms(kind, block), bias=bias,
                       implementation=impl, dtype=F64, groups=groups, padding_mode=mode, **case)
    x = torch.randn(C_IN, *HW, dtype=F64) if unbatched else torch.randn(2, C_IN, *HW, dtype=F64)
    check(layer, reference, x)


@pytest.mark.parametrize("impl", ["auto", "factored", "composed"])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("terms", [[(2, 3)], [(2, 3)] * 2, [(2, 3), (4, 2), (2, 3)], [(8, 12)]])
def test_kron_linear_matches_nn_linear(impl, lead, bias, terms):
    torch.manual_seed(0)
    layer = KronLinear(12, 8, terms, bias=bias, implementation=impl, dtype=F64)
    check(layer, nn.Linear(12, 8, bias=bias, dtype=F64), torch.randn(*lead, 12, dtype=F64))
