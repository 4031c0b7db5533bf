"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares, in torch, no TensorLy.

Used by ``CPConv2d.from_conv`` (Lebedev et al. 2015 fit the kernel the same way). Kolda and
Bader, "Tensor Decompositions and Applications" (SIAM Review 2009), section 3.4: each factor in
turn is the exact least-squares solution given the others, so the error never increases.
"""

from __future__ import annotations

import math

import torch


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: rows indexed by that mode, columns by the others, row-major."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def khatri_rao(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product, first matrix's row index slowest (matches ``unfold``)."""
    out = matrices[0]
    for m in matrices[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, out.shape[1])
    return out


def cp_to_tensor(factors: list[torch.Tensor]) -> torch.Tensor:
    """``sum_r factors[0][:, r] o factors[1][:, r] o ...`` as a dense tensor."""
    shape = tuple(f.shape[0] for f in factors)
    return (factors[0] @ khatri_rao(factors[1:]).T).reshape(shape)


def balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale each component so that all its factor columns have the same norm."""
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (n_modes, rank)
    target = norms.prod(dim=0) ** (1.0 / len(factors))
    tiny = torch.finfo(norms.dtype).tiny
    return [f * (target / n.clamp_min(tiny)) for f, n in zip(factors, norms, strict=True)]


def cp_exact(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Exact CP decomposition at the trivial rank bound ``numel / max(shape)``.

    Every index tuple of the other modes is one component: one-hot factors on those modes and
    the matching fibre of the largest mode. No tensor needs a larger CP rank than this.
    """
    big = max(range(tensor.dim()), key=lambda m: tensor.shape[m])
    others = [m for m in range(tensor.dim()) if m != big]
    rank = math.prod(tensor.shape[m] for m in others)
    index = torch.arange(rank, device=tensor.device)
    factors: list[torch.Tensor] = [torch.empty(0)] * tensor.dim()
    factors[big] = unfold(tensor, big)
    stride = rank
    for m in others:
        stride //= tensor.shape[m]
        rows = (index // stride) % tensor.shape[m]
        one_hot = torch.zeros(tensor.shape[m], rank, dtype=tensor.dtype, device=tensor.device)
        one_hot[rows, index] = 1.0
        factors[m] = one_hot
    return balance(factors)


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    n_iter_max: int = 1000,
    tol: float = 1e-9,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[float]]:
    """Rank-``rank`` CP fit by ALS; returns balanced factors and the relative error per sweep.

    Deterministic: factors start from the leading left singular vectors of each unfolding
    (columns beyond a mode's size from a normal draw seeded by ``seed``). Stops when a sweep
    lowers the relative error by less than ``tol`` times itself, or after ``n_iter_max`` sweeps.
    Computes in ``tensor``'s dtype; pass float64 for accurate fits.
    """
    n_modes = tensor.dim()
    generator = torch.Generator().manual_seed(seed)
    factors = []
    for m in range(n_modes):
        u = torch.linalg.svd(unfold(tensor, m), full_matrices=False)[0][:, :rank]
        if u.shape[1] < rank:
            extra = torch.randn(tensor.shape[m], rank - u.shape[1], generator=generator)
            u = torch.cat([u, extra.to(u)], dim=1)
        factors.append(u)
    norm = tensor.norm().clamp_min(torch.finfo(tensor.dtype).tiny)
    errors: list[float] = []
    for _ in range(n_iter_max):
        for m in range(n_modes):
            others = [factors[k] for k in range(n_modes) if k != m]
            gram = torch.ones(rank, rank, dtype=tensor.dtype, device=tensor.device)
            for f in others:
                gram = gram * (f.T @ f)
            mttkrp = unfold(tensor, m) @ khatri_rao(others)
            factor = mttkrp @ torch.linalg.pinv(gram, hermitian=True)
            if m < n_modes - 1:  # keep the scale in the last factor, for numerical range
                factor = factor / factor.norm(dim=0).clamp_min(torch.finfo(factor.dtype).tiny)
            factors[m] = factor
        errors.append(float((tensor - cp_to_tensor(factors)).norm() / norm))
        if errors[-1] == 0.0 or (len(errors) > 1 and errors[-2] - errors[-1] < tol * errors[-2]):
            break
    return balance(factors), errors
