"""Fitting sums of Kronecker products to a trained dense weight.

For one fixed term shape the best rank-R sum ``sum_r A_r (x) B_r`` in Frobenius norm is a
truncated SVD of the *rearranged* weight (Van Loan and Pitsianis, "Approximation with Kronecker
products", 1993): every entry ``W[idx]`` splits into an A index and a B index, and the map
``W -> R(W)`` with ``R[a_idx, b_idx] = W[idx]`` turns ``A (x) B`` into the rank-1 matrix
``vec(A) vec(B)^T``. The same holds for any number of axes (4 for conv kernels), with the
``torch.kron`` convention that the A index is the slow one on every axis.

Mixed shapes have no closed form. :func:`fit_kronecker_sum` fits them by block coordinate
descent: each shape group in turn is replaced by its optimal (SVD) fit to the weight minus the
other groups, starting from a greedy pass on the residual. Every step is optimal given the others,
so the error never increases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Shape = tuple[int, ...]


def b_shape_for(weight_shape: Sequence[int], a_shape: Sequence[int]) -> Shape:
    """B's shape for a term whose A has ``a_shape`` (each axis of W is A's times B's)."""
    return tuple(int(d) // int(a) for d, a in zip(weight_shape, a_shape))


def rearrange(weight: torch.Tensor, a_shape: Sequence[int]) -> torch.Tensor:
    """Van Loan-Pitsianis rearrangement: ``A (x) B`` becomes ``outer(vec A, vec B)``.

    ``weight`` of shape ``(a_0 b_0, a_1 b_1, ...)`` is viewed as ``(a_0, b_0, a_1, b_1, ...)``,
    permuted to ``(a_0, a_1, ..., b_0, b_1, ...)`` and flattened to ``(prod a, prod b)``.
    """
    nd = weight.dim()
    b_shape = b_shape_for(weight.shape, a_shape)
    interleaved = [s for pair in zip(a_shape, b_shape) for s in pair]
    perm = list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2))
    return (
        weight.reshape(interleaved)
        .permute(perm)
        .reshape(math.prod(a_shape), math.prod(b_shape))
    )


def kron_compose(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_r kron(a[r], b[r])`` for stacked factors ``a (R, *a_shape)``, ``b (R, *b_shape)``.

    Same index convention as ``torch.kron``. The sum over ``r`` is one GEMM,
    ``(prod a, R) @ (R, prod b)``, whose ``[a_idx, b_idx]`` entry is the rearranged weight
    (:func:`rearrange`); a permutation interleaves the axes. Peak memory: one temporary of W's
    size (the GEMM's output), never an R-fold one. With ``out`` (W's shape), the sum is added to
    ``out`` in place and ``out`` is returned, so that several shape groups accumulate into one
    buffer (docs/notes/cpu_inference_memory.md).
    """
    return kron_compose_blocks(a.unsqueeze(0), b.unsqueeze(0), out)


def kron_compose_blocks(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`kron_compose` of ``G`` independent blocks stacked along the first axis of W:
    ``a (G, R, *a_shape)``, ``b (G, R, *b_shape)`` -> ``(G * a0 * b0, a1 * b1, ...)``, the
    weight layout of a grouped ``nn.Conv2d`` (block ``g`` holds output channels
    ``g*F/G .. (g+1)*F/G - 1``). One batched GEMM for all blocks."""
    g, r = a.shape[:2]
    a_shape, b_shape = tuple(a.shape[2:]), tuple(b.shape[2:])
    nd = len(a_shape)
    outer = torch.bmm(a.reshape(g, r, -1).transpose(1, 2), b.reshape(g, r, -1))
    interleave = [0] + [i + 1 for k in range(nd) for i in (k, nd + k)]
    part = outer.view(g, *a_shape, *b_shape).permute(interleave)  # (G, a0, b0, a1, b1, ...)
    sizes = [x * y for x, y in zip(a_shape, b_shape)]
    if out is None:
        return part.reshape(g * sizes[0], *sizes[1:])
    out.view(g, *[s for pair in zip(a_shape, b_shape) for s in pair]).add_(part)
    return out


#: Up to this size of the rearranged matrix's smaller side a full SVD is cheap; above it, the
#: leading singular triplets come from ARPACK (exact to machine precision, not randomised).
FULL_SVD_MAX = 1024


def top_singular_triplets(
    mat: torch.Tensor, rank: int, full_svd_max: int = FULL_SVD_MAX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` leading singular triplets ``(u, s, vh)`` of a float64 matrix, descending.

    A full SVD when the smaller side is at most ``full_svd_max`` or the rank is large;
    otherwise ``scipy.sparse.linalg.svds`` (Lanczos), which costs a few products with the
    matrix instead of a cubic factorisation: a 6144 x 6144 rearranged AlexNet FC weight takes
    seconds instead of minutes. Both give the same triplets (up to the signs of singular
    vector pairs); ``full_svd_max`` only moves the switch between them.
    """
    small = min(mat.shape)
    if small <= full_svd_max or rank > small // 8:
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    from scipy.sparse.linalg import svds

    u, s, vh = svds(mat.cpu().numpy(), k=rank, tol=0, random_state=0)
    order = s.argsort()[::-1].copy()
    to = {"dtype": mat.dtype, "device": mat.device}
    return (torch.from_numpy(u[:, order].copy()).to(**to), torch.from_numpy(s[order]).to(**to),
            torch.from_numpy(vh[order].copy()).to(**to))


def nearest_kronecker(
    weight: torch.Tensor, a_shape: Sequence[int], rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal ``rank``-term Kronecker sum of one shape, by truncated SVD.

    Returns ``(a, b, error)`` with ``a (rank, *a_shape)``, ``b (rank, *b_shape)`` and ``error``
    the Frobenius norm ``||W - sum kron(a_r, b_r)||``, which is the optimum: the norm of the
    singular values left out. The singular value is split evenly (``sqrt(s)`` to each factor) to
    balance their scales. Computed in float64, returned in ``weight``'s dtype.
    """
    a_shape = tuple(int(s) for s in a_shape)
    b_shape = b_shape_for(weight.shape, a_shape)
    mat = rearrange(weight.detach().to(torch.float64), a_shape)
    max_rank = min(mat.shape)
    if not 1 <= rank <= max_rank:
        raise ValueError(
            f"Kronecker rank {rank} for A shape {a_shape} of a weight of shape "
            f"{tuple(weight.shape)} is out of range: valid ranks are 1..{max_rank}"
        )
    u, s, vh = top_singular_triplets(mat, rank)
    root = s.sqrt()
    a = (u * root).T.reshape((rank,) + a_shape)
    b = (vh * root[:, None]).reshape((rank,) + b_shape)
    error = (mat - (u * s) @ vh).norm()
    return a.to(weight.dtype), b.to(weight.dtype), error.to(weight.dtype)


def fit_kronecker_sum(
    weight: torch.Tensor,
    groups: Sequence[tuple[Sequence[int], int]],
    sweeps: int = 10,
    tol: float = 1e-6,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fit ``sum_g sum_r A_gr (x) B_gr`` with one ``(a_shape, rank)`` per group ``g``.

    One group: the optimal SVD fit. Several: a greedy pass (each group fits the residual the
    previous ones left), then up to ``sweeps`` passes of block coordinate descent (each group
    refit optimally to ``W`` minus the others), stopping early once a pass improves the error by
    less than ``tol`` relative. The error is non-increasing at every step; the result is a local
    optimum, not a certified global one.
    """
    w = weight.detach().to(torch.float64)
    factors: list[tuple[torch.Tensor, torch.Tensor]] = []
    parts: list[torch.Tensor] = []
    residual = w.clone()
    for a_shape, rank in groups:
        a, b, _ = nearest_kronecker(residual, a_shape, rank)
        part = kron_compose(a, b)
        residual -= part
        factors.append((a, b))
        parts.append(part)
    if len(groups) > 1:
        error = residual.norm().item()
        for _ in range(sweeps):
            for g, (a_shape, rank) in enumerate(groups):
                target = residual + parts[g]
                a, b, _ = nearest_kronecker(target, a_shape, rank)
                parts[g] = kron_compose(a, b)
                residual = target - parts[g]
                factors[g] = (a, b)
            previous, error = error, residual.norm().item()
            if previous - error <= tol * previous:
                break
    return [(a.to(weight.dtype), b.to(weight.dtype)) for a, b in factors]
