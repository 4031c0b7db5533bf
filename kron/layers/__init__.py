"""Kronecker-factored layers and the low-rank baselines they generalise: the ground floor of
kron (imports torch, the standard library and, lazily, triton; nothing else of kron)."""

from kron.layers.decompose import fit_kronecker_sum, kron_compose, nearest_kronecker
from kron.layers.errors import FactorizationError
from kron.layers.factory import factorize, relative_fit_error
from kron.layers.kinds import (
    LayerKind,
    layer_kind,
    layer_kinds,
    register_layer_kind,
    unregister_layer_kind,
)
from kron.layers.kron_conv import KronConv2d
from kron.layers.kron_linear import KronLinear
from kron.layers.lowrank import CPConv2d, LowRankLinear, SeparableConv2d, TuckerConv2d
from kron.layers.shapes import (
    SHAPE_RULES,
    Factorization,
    choose_terms,
    factorizations,
    kron_term_shapes,
)

__all__ = [
    "KronLinear",
    "KronConv2d",
    "LowRankLinear",
    "SeparableConv2d",
    "CPConv2d",
    "TuckerConv2d",
    "Factorization",
    "FactorizationError",
    "factorizations",
    "kron_term_shapes",
    "choose_terms",
    "SHAPE_RULES",
    "nearest_kronecker",
    "fit_kronecker_sum",
    "kron_compose",
    "factorize",
    "relative_fit_error",
    "LayerKind",
    "layer_kind",
    "layer_kinds",
    "register_layer_kind",
    "unregister_layer_kind",
]
