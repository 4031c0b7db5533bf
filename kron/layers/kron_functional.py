"""The Kronecker layers' forward formulas as plain functions (docs/design.md, section 1).

Linear: ``y = x W^T`` with ``W = sum_r A_r (x) B_r`` computed as ``vec(A_r X B_r^T)``, two GEMMs
per shape group. Conv: two convolutions (or a matmul and a convolution) per shape group. Every
batched product here is a ``bmm`` over an *expanded* factor, never a broadcasting 2-D @ 3-D
``matmul``: that one decomposes under ``torch.export`` with a ``batch == 1`` guard when traced
at batch 1, which froze the exported batch size (issue 19). Output sizes come from the input's
sizes (not from dividing a flattened product), so ``torch.compile(dynamic=True)`` sees plain
symbolic sizes.

Factors arrive stacked: linear ``a (R, m1, n1)``, ``b (R, m2, n2)``; conv per block (the conv's
``groups``) ``a (G, R, F1, C1, kh1, kw1)``, ``b (G, R, F2, C2, kh2, kw2)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kron.layers.macs import a_first, is_pointwise, linear_order


def _traced() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _channel_mix(t: torch.Tensor, mat: torch.Tensor, inner: int) -> torch.Tensor:
    """``out[n, (g, p), (j, ...)] = sum_q mat[g, p, q] t[n, (g, q), (j, ...)]`` for ``t
    (N, G*Q*inner, h, w)`` -> ``(N, G*P*inner, h, w)``: the channel mixing of a pointwise A.

    Eager: one ``bmm`` over an expanded ``mat`` (fast on every backend). Traced (compile,
    export): a 1x1x1 ``conv3d`` that keeps ``h`` and ``w`` as axes, because flattening them
    into the bmm's last axis and splitting them again gives sizes like ``(s**2)//s`` that
    Inductor cannot order (``cannot determine truth value of Relational``, issue 19)."""
    g, p, q = mat.shape
    n, _, h, w = t.shape
    if _traced():
        y = F.conv3d(t.reshape(n, g * q, inner, h, w), mat.reshape(g * p, q, 1, 1, 1), groups=g)
        return y.reshape(n, g * p * inner, h, w)
    y = torch.bmm(_batched(mat, n), t.reshape(n * g, q, inner * h * w))
    return y.reshape(n, g * p * inner, h, w)


def _batched(mat: torch.Tensor, batch: int | torch.SymInt) -> torch.Tensor:
    """``mat (G, p, q)`` repeated for ``batch`` samples as ``(batch*G, p, q)`` (a view when
    ``G == 1``)."""
    if mat.shape[0] == 1:
        return mat.expand(batch, *mat.shape[1:])
    return mat.unsqueeze(0).expand(batch, *mat.shape).reshape(-1, *mat.shape[1:])


# ----------------------------------------------------------------------------------- linear


def intermediate_per_row(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements of :func:`kron_matvec`'s intermediate per input row."""
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    return n1 * rank * m2 if linear_order((m1, n1), (m2, n2)) == "b" else m1 * rank * n2


def _linear_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``(order, first, second)``: the contraction order and the two factors laid out so that
    the sum over terms rides inside the second GEMM (no intermediate is permuted)."""
    rank, m1, n1 = a.shape
    _, m2, n2 = b.shape
    if linear_order((m1, n1), (m2, n2)) == "b":
        return ("b", b.reshape(rank * m2, n2).t(),
                a.permute(1, 2, 0).reshape(1, m1, n1 * rank))  # [i, (k, r)]
    return ("a", a.permute(1, 0, 2).reshape(1, m1 * rank, n1),  # [(i, r), k]
            b.permute(1, 0, 2).reshape(m2, rank * n2).t())  # [(r, l), j]


def kron_matvec(x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_r vec(A_r X B_r^T)`` for each row of ``x2 (N, n1*n2)`` -> ``(N, m1*m2)``."""
    rows = x2.shape[0]
    m1, n1, m2, n2 = a.shape[1], a.shape[2], b.shape[1], b.shape[2]
    order, first, second = _linear_operands(a, b)
    if order == "b":
        t = torch.mm(x2.reshape(-1, n2), first)  # (N*n1, R*m2)
        y = torch.bmm(_batched(second, rows), t.reshape(rows, -1, m2))
    else:
        u = torch.bmm(_batched(first, rows), x2.reshape(rows, n1, n2))  # (N, m1*R, n2)
        y = torch.mm(u.reshape(rows * m1, -1), second)
    return y.reshape(rows, m1 * m2)


def kron_matvec_into(x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                     ws: torch.Tensor, accumulate: bool) -> None:
    """:func:`kron_matvec` of a block of rows written (or, with ``accumulate``, added) into
    ``out (rows, m1*m2)``, its intermediate in the flat buffer ``ws`` (inference only: these
    ``out=`` writes are invisible to autograd)."""
    rows = x2.shape[0]
    m1, n1, m2, n2 = a.shape[1], a.shape[2], b.shape[1], b.shape[2]
    beta = 1 if accumulate else 0
    t = ws[: rows * intermediate_per_row(a, b)]
    order, first, second = _linear_operands(a, b)
    if order == "b":
        t2 = t.view(rows * n1, -1)
        torch.mm(x2.reshape(rows * n1, n2), first, out=t2)
        target = out.view(rows, m1, m2)
        torch.baddbmm(target, _batched(second, rows), t2.view(rows, -1, m2), beta=beta,
                      out=target)
    else:
        u = t.view(rows, -1, n2)
        torch.bmm(_batched(first, rows), x2.reshape(rows, n1, n2), out=u)
        target = out.view(rows * m1, m2)
        torch.addmm(target, u.view(rows * m1, -1), second, beta=beta, out=target)


# ------------------------------------------------------------------------------------- conv


def _stage_b(x: torch.Tensor, b: torch.Tensor, c1: int, stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """Every ``B_r`` of each block over each of its ``C1`` input channel slices:
    ``x (N, G*C1*C2, H, W)`` -> ``(N, G*C1*R*F2, h1, w1)``."""
    g, rank, f2, c2, kh, kw = b.shape
    n, _, h, w = x.shape
    if g == 1:
        z = F.conv2d(x.reshape(n * c1, c2, h, w), b.reshape(rank * f2, c2, kh, kw),
                     stride=stride, padding=padding, dilation=dilation)
        # contiguous: with a size-1 axis the conv may return channels_last strides
        return z.contiguous().reshape(n, c1 * rank * f2, z.shape[-2], z.shape[-1])
    weight = b.reshape(g, 1, rank * f2, c2, kh, kw).expand(g, c1, rank * f2, c2, kh, kw)
    return F.conv2d(x, weight.reshape(-1, c2, kh, kw), stride=stride, padding=padding,
                    dilation=dilation, groups=g * c1).contiguous()


def _pointwise_a_first(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pad, stride,
                       dilation, ws: torch.Tensor | None) -> torch.Tensor:
    """A mixes each block's ``C1`` slices (one bmm, into ``ws`` when given), then one conv
    with every ``B_r`` of the block produces the output. ``pad`` is ``(padding of the conv,
    a function padding u or None)``."""
    g, rank, f1, c1 = a.shape[:4]
    _, _, f2, c2, kh, kw = b.shape
    n, _, h, w = x.shape
    a2 = a.reshape(g, rank, f1, c1).transpose(1, 2).reshape(g, f1 * rank, c1)  # [(f1,r),c1]
    if ws is None:
        u = _channel_mix(x, a2, c2)
    else:
        u = ws[: n * g * f1 * rank * c2 * h * w].view(n * g, f1 * rank, -1)
        torch.bmm(_batched(a2, n), x.reshape(n * g, c1, c2 * h * w), out=u)
        u = u.view(n, g * f1 * rank * c2, h, w)  # channels (g, f1, r, c2)
    conv_padding, pad_u = pad
    if pad_u is not None:
        u = pad_u(u)
    bw = b.permute(0, 2, 1, 3, 4, 5).reshape(g, 1, f2, rank * c2, kh, kw)  # [f2, (r, c2)]
    if g == 1:
        y = F.conv2d(u.reshape(n * f1, rank * c2, u.shape[-2], u.shape[-1]),
                     bw.reshape(f2, rank * c2, kh, kw), stride=stride, padding=conv_padding,
                     dilation=dilation)
        return y.reshape(n, f1 * f2, y.shape[-2], y.shape[-1])
    bw = bw.expand(g, f1, f2, rank * c2, kh, kw).reshape(-1, rank * c2, kh, kw)
    return F.conv2d(u, bw, stride=stride, padding=conv_padding, dilation=dilation,
                    groups=g * f1)


def _pointwise_b_first(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, padding, stride,
                       dilation) -> torch.Tensor:
    """B's conv (with the layer's stride) over each ``C1`` slice, then A mixes the slices."""
    g, rank, f1, c1 = a.shape[:4]
    f2 = b.shape[2]
    z = _stage_b(x, b, c1, stride, padding, dilation)
    a2 = a.reshape(g, rank, f1, c1).permute(0, 2, 3, 1).reshape(g, f1, c1 * rank)
    return _channel_mix(z, a2, f2)


def _spatial(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stride, dilation) -> torch.Tensor:
    """B's conv over each ``C1`` slice of the padded input, then A's conv across the slices
    with dilation ``(kh2, kw2)`` times the layer's (A is the slow index of the kernel)."""
    g, rank, f1, c1, kh1, kw1 = a.shape
    f2, kh2, kw2 = b.shape[2], b.shape[4], b.shape[5]
    n = x.shape[0]
    z = _stage_b(x, b, c1, (1, 1), (0, 0), dilation)
    h1, w1 = z.shape[-2:]
    zt = (z.reshape(n, g * c1 * rank, f2, h1, w1).transpose(1, 2)
          .reshape(n * f2, g * c1 * rank, h1, w1))
    a2 = a.permute(0, 2, 3, 1, 4, 5).reshape(g * f1, c1 * rank, kh1, kw1)  # [f1, (c1, r)]
    y = F.conv2d(zt, a2, stride=stride, dilation=(dilation[0] * kh2, dilation[1] * kw2),
                 groups=g)
    ho, wo = y.shape[-2:]
    return y.reshape(n, f2, g * f1, ho, wo).transpose(1, 2).reshape(n, g * f1 * f2, ho, wo)


def kron_conv_group(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                    stride: tuple[int, int], dilation: tuple[int, int],
                    conv_padding: tuple[int, int] | None, pad, ws: torch.Tensor | None = None,
                    ) -> torch.Tensor:
    """One shape group of the factored conv on ``x (N, C, H, W)`` -> ``(N, F, Ho, Wo)``.

    ``conv_padding`` is the symmetric zero padding a stage may apply itself, or None; then
    ``pad`` (a function of a 4-D tensor: the layer's padding in its mode) pads explicitly.
    ``ws`` is a reused flat buffer for the A-first matmul (inference only)."""
    a_shape, b_shape = tuple(a.shape[2:]), tuple(b.shape[2:])
    if is_pointwise(a_shape):
        if a_first(a_shape, b_shape, stride):
            spec = (conv_padding, None) if conv_padding is not None else ((0, 0), pad)
            return _pointwise_a_first(x, a, b, spec, stride, dilation, ws)
        if conv_padding is None:
            x, conv_padding = pad(x), (0, 0)
        return _pointwise_b_first(x, a, b, conv_padding, stride, dilation)
    return _spatial(pad(x) if conv_padding is None else _zero_pad(x, conv_padding), a, b,
                    stride, dilation)


def _zero_pad(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    ph, pw = padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def kron_conv_group_convs(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                          stride: tuple[int, int], dilation: tuple[int, int],
                          conv_padding: tuple[int, int] | None, pad) -> torch.Tensor:
    """:func:`kron_conv_group` as two plain convolutions on 4-D tensors, no reshape between
    them: B over every ``C1`` slice as one grouped conv, then A with an ``F2``-fold identity
    (``kron(A, I_F2)``, ``F2`` times stage 2's MACs) that writes the output layout directly.

    For ``torch.compile`` training: Inductor's CPU layout pass fails on a saved 4-D *view*
    with symbolic sizes (every reshape between the stages is one), see docs/notes."""
    g, rank, f1, c1, kh1, kw1 = a.shape
    _, _, f2, c2, kh2, kw2 = b.shape
    pointwise = kh1 == 1 and kw1 == 1
    if conv_padding is None:
        x, conv_padding = pad(x), (0, 0)
    elif not pointwise:
        x, conv_padding = _zero_pad(x, conv_padding), (0, 0)
    wb = b.reshape(g, 1, rank * f2, c2, kh2, kw2).expand(g, c1, rank * f2, c2, kh2, kw2)
    z = F.conv2d(x, wb.reshape(-1, c2, kh2, kw2), stride=stride if pointwise else (1, 1),
                 padding=conv_padding, dilation=dilation, groups=g * c1)  # (g, c1, r, f2)
    eye = torch.eye(f2, dtype=a.dtype, device=a.device)
    wa = torch.einsum("grpcuv,ij->gpicrjuv", a, eye).reshape(g * f1 * f2, c1 * rank * f2,
                                                                kh1, kw1)
    return F.conv2d(z, wa, stride=(1, 1) if pointwise else stride,
                    dilation=(dilation[0] * kh2, dilation[1] * kw2), groups=g)
