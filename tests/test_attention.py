"""ProjectedMultiheadAttention computes what nn.MultiheadAttention computes (float64), for every
input layout and mask kind, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kron.layers import FactorizationError
from kron.models.attention import ProjectedMultiheadAttention

N, L, S, E, H = 3, 5, 4, 8, 2


def masks(s: int, n: int | None) -> dict[str, dict]:
    """Every mask kind for ``s`` keys and a batch of ``n`` (None: one unbatched sequence)."""
    g = torch.Generator().manual_seed(1)
    pad = torch.zeros(n or 1, s, dtype=torch.bool)
    pad[:, -1] = True
    per_head = torch.randn((n or 1) * H, L, s, generator=g, dtype=torch.float64)
    if n is None:
        pad = pad[0]
    return {
        "none": {},
        "key_padding_bool": {"key_padding_mask": pad},
        "key_padding_float": {"key_padding_mask": pad.double() * -3.0},
        "attn_bool": {"attn_mask": torch.ones(L, s, dtype=torch.bool).triu(1)},
        "attn_float_per_head": {"attn_mask": per_head},
        "heads_apart": {"average_attn_weights": False},
        "no_weights": {"need_weights": False},
    }


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("attend", ["self", "cross", "unbatched"])
@pytest.mark.parametrize("mask", list(masks(S, N)))
def test_equals_multihead_attention(batch_first, attend, mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).double().eval()
    mine = ProjectedMultiheadAttention.from_mha(mha)
    x = torch.randn(N, L, E, dtype=torch.float64)
    y = torch.randn(N, S, E, dtype=torch.float64)
    args = {"self": (x, x, x), "cross": (x, y, y), "unbatched": (x[0], y[0], y[0])}[attend]
    kwargs = masks(L if attend == "self" else S, None if attend == "unbatched" else N)[mask]
    if not batch_first and attend != "unbatched":
        args = tuple(t.transpose(0, 1) for t in args)
    if attend == "cross":
        args = (args[0].clone().requires_grad_(), *(args[1].clone().requires_grad_(),) * 2)
    want, got = mha(*args, **kwargs), mine(*args, **kwargs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    if attend == "cross":
        g_want = torch.autograd.grad(want[0].square().sum(), args[:2])
        g_got = torch.autograd.grad(got[0].square().sum(), args[:2])
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_refuses_attention_without_one_packed_projection():
    with pytest.raises(FactorizationError, match="add_bias_kv"):
        ProjectedMultiheadAttention.from_mha(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(FactorizationError, match="kdim"):
        ProjectedMultiheadAttention.from_mha(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
