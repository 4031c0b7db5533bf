"""KronLinear: ``y = x W^T + b`` with ``W = sum_i A_i (x) B_i`` (docs/design.md, section 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kron.layers import cost_model
from kron.layers.decompose import b_shape_for
from kron.layers.errors import FactorizationError
from kron.layers.kron_base import KroneckerSum
from kron.layers.kron_functional import intermediate_per_row, kron_matvec, kron_matvec_into
from kron.layers.macs import linear_group_macs, linear_macs


class KronLinear(KroneckerSum):
    """A drop-in ``nn.Linear`` whose weight ``(out x in)`` is ``sum_i A_i (x) B_i``.

    ``terms`` lists the A shapes ``(m1, n1)``, one per Kronecker term; B of a term is
    ``(out_features // m1, in_features // n1)``. Factors of one shape are stored stacked,
    ``a_factors[g]: (R, m1, n1)``, ``b_factors[g]: (R, m2, n2)``. Takes any leading dims,
    a 1-D input included. The factored forward computes ``vec(A X B^T)`` with
    ``X = x.reshape(n1, n2)`` for all terms of one shape in two matmuls.

    ``inference_chunk_floats``: CPU inference runs rows in chunks whose intermediate holds at
    most this many elements per thread (1 MiB of float32 by default), in a buffer the layer
    keeps, so that each chunk stays in cache between the two GEMMs.
    """

    implementations = ("auto", "factored", "composed", "triton")
    inference_chunk_floats: int = 1 << 18

    def __init__(
        self,
        in_features: int,
        out_features: int,
        terms: Sequence[Sequence[int]],
        bias: bool = True,
        implementation: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if implementation == "triton":
            from kron.layers.triton_linear import require_triton

            require_triton(torch.device(device) if device is not None else torch.empty(0).device)
        super().__init__((self.out_features, self.in_features), 1, terms, bias, implementation,
                         device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, terms: Sequence[Sequence[int]],
                    implementation: str = "auto", sweeps: int = 10) -> KronLinear:
        """The Kronecker approximation of a trained ``nn.Linear`` (same dtype, device, bias).

        One term shape: the optimal fit (truncated SVD of the rearranged weight, Van Loan and
        Pitsianis); exact at full rank. Mixed shapes: block coordinate descent
        (:func:`kron.layers.decompose.fit_kronecker_sum`).
        """
        if not isinstance(linear, nn.Linear):
            raise FactorizationError(f"KronLinear.from_linear: expected an nn.Linear, got "
                                     f"{type(linear).__name__}; use KronConv2d.from_conv for convs")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, terms, bias=linear.bias is not None,
                    implementation=implementation, device=w.device, dtype=w.dtype)
        layer._load_dense(w, linear.bias, sweeps)
        return layer

    def factor_pairs(self, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor,
                                                                           torch.Tensor]]:
        """``(a (R, m1, n1), b (R, m2, n2))`` per term group (see :meth:`block_pairs`)."""
        return [(a[0], b[0]) for a, b in self.block_pairs(dtype)]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"KronLinear expects inputs with last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        return x.reshape(-1, self.in_features)

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        self._rows(x)
        return F.linear(x, self._cached_dense_weight(), self.bias)

    def _forward_factored(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        x2 = self._rows(x)
        pairs = self.factor_pairs(dtype)
        bias = self._bias(x2.dtype)
        if self._fast_cpu_inference(x):
            out = self._inference_cpu(x2, pairs)
            if bias is not None:
                out.add_(bias)
        else:
            out = None
            for a, b in pairs:
                y = kron_matvec(x2, a, b)
                out = y if out is None else out + y
            if bias is not None:
                out = out + bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def _forward_triton(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        from kron.layers.triton_linear import kron_linear_triton, require_triton

        x2 = self._rows(x)
        require_triton(x.device)
        out = None
        for a, b in self.factor_pairs(dtype):
            y = kron_linear_triton(x2, a, b)
            out = y if out is None else out + y
        bias = self._bias(out.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def _inference_cpu(self, x2: torch.Tensor, pairs: list) -> torch.Tensor:
        """CPU inference: rows in chunks whose intermediate fits in cache, every group
        accumulated into the output in place, the intermediate in the layer's workspace.
        Allocates nothing batch-sized but the output."""
        n_rows = x2.shape[0]
        out = x2.new_empty((n_rows, self.out_features))
        widest = max(intermediate_per_row(a, b) for a, b in pairs)
        budget = self.inference_chunk_floats * max(1, torch.get_num_threads())
        chunk = max(1, min(n_rows, budget // widest))
        ws = self._workspace(x2, chunk * widest)
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            for g, (a, b) in enumerate(pairs):
                kron_matvec_into(x2[start:stop], a, b, out[start:stop], ws, accumulate=g > 0)
        return out

    # -- cost -------------------------------------------------------------------------------

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        return linear_macs(input_shape, self.in_features, self.out_features)

    def group_macs(self, input_shape: Sequence[int]) -> list[int]:
        rows = math.prod([int(s) for s in input_shape[:-1]])
        return [linear_group_macs(a, b_shape_for(self.block_shape, a), r, rows)
                for a, r in self.term_groups]

    def workload(self, input_shape: Sequence[int], device_type: str) -> cost_model.Workload:
        macs = self.group_macs(input_shape)
        factored = {"factored": tuple(cost_model.GroupCost("linear", m, 3) for m in macs),
                    "triton": tuple(cost_model.GroupCost("linear_triton", m, 1) for m in macs)}
        return cost_model.Workload(self.dense_macs(input_shape), math.prod(self.weight_shape),
                                   tuple(r for _, r in self.term_groups), factored)

    def candidates(self, device_type: str) -> list[str]:
        found = ["factored", "composed"]
        if device_type == "cuda" and torch.cuda.is_available() and self._triton_ok():
            found.append("triton")
        return found

    def _triton_ok(self) -> bool:
        """Triton can run here, its kernel handles every term group in the dtype it would run
        in (autocast's, else the factors'), and it passed its numerical self-check on this
        device in that dtype (:func:`kron.layers.triton_selfcheck.verified`, once per pair)."""
        from kron.layers import triton_linear, triton_selfcheck

        if not triton_linear.triton_available():
            return False
        device = self.a_factors[0].device
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.a_factors[0].dtype)
        return (all(triton_linear.triton_supports(a.shape, b.shape, dtype)
                    for a, b in self.factor_pairs())
                and triton_selfcheck.verified(device, dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.extra_repr_terms()}")
