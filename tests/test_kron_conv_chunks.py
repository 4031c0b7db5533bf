"""KronConv2d's CPU inference in chunks of samples (``inference_chunk_floats``) computes what
the unchunked forward computes: every chunk size, batch remainders, groups, padding modes and
spatial or pointwise A (float64, so the two agree to rounding of the same sums)."""

from __future__ import annotations

import pytest
import torch

from kron.layers import KronConv2d

F64 = torch.float64
CASES = [
    dict(terms=[(4, 4, 1, 1)], padding=1),
    dict(terms=[(4, 2, 3, 1), (2, 4, 1, 3)], padding="same", padding_mode="reflect"),
    dict(terms=[(2, 2, 1, 1)] * 2, padding=(1, 0), stride=2, groups=2),
]


@pytest.mark.parametrize("case", CASES, ids=["pointwise", "spatial-mixed", "grouped-stride"])
@pytest.mark.parametrize("floats", [1, 3000, 1 << 30])  # one sample, a few, the whole batch
def test_chunked_inference_equals_the_autograd_forward(case, floats):
    torch.manual_seed(0)
    layer = KronConv2d(8, 8, 3, dtype=F64, implementation="factored", **case)
    layer.inference_chunk_floats = floats
    x = torch.randn(5, 8, 9, 7, dtype=F64)
    reference = layer(x.requires_grad_())  # autograd records: the unchunked path
    with torch.no_grad():
        chunked = layer(x.detach())
    torch.testing.assert_close(chunked, reference.detach(), rtol=1e-12, atol=1e-12)
