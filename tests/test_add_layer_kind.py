"""A new layer kind is one module plus one YAML file, and nothing else is edited
(docs/notes/kinds.md, "Adding a layer kind").

The throwaway kind lives in tmp_path: its module defines a tiny rank-knob conv class (a 1x1 conv
``C -> rank`` then a ``k x k`` conv ``rank -> F``) and registers it
(kron.layers.register_layer_kind); its layers YAML sits in a config folder that Hydra searches
(``hydra.searchpath``) and names the module (``module:``). The factory, the budget search, layer
surgery and the schema then take it like any of kron's own kinds.
"""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Iterator
from importlib import import_module

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from kron.config_compose import compose_train
from kron.config_schema import ConfigError, check_train_config
from kron.layers import (
    FactorizationError,
    factorize,
    layer_kinds,
    register_layer_kind,
    relative_fit_error,
    unregister_layer_kind,
)
from kron.models import build_model_from_config
from kron.models.surgery import apply_surgery

MODULE = '''
"""A throwaway rank-knob conv kind: W[f, c, i, j] = sum_r B[f, r, i, j] A[r, c]."""
import torch
import torch.nn.functional as F
from torch import nn

from kron.layers import register_layer_kind


class PointwiseFirst(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0,
                 dilation=1, bias=True, device=None, dtype=None):
        super().__init__()
        k = tuple(kernel_size) if not isinstance(kernel_size, int) else (kernel_size,) * 2
        top = self.max_rank(in_channels, out_channels, k)
        if not (isinstance(rank, int) and 1 <= rank <= top):
            raise ValueError(f"PointwiseFirst: rank must be an int in [1, {top}], got {rank!r}")
        self.rank, self.stride, self.padding, self.dilation = rank, stride, padding, dilation
        place = dict(device=device, dtype=dtype)
        self.weight_a = nn.Parameter(torch.randn(rank, in_channels, 1, 1, **place)
                                     / in_channels ** 0.5)
        self.weight_b = nn.Parameter(torch.randn(out_channels, rank, *k, **place)
                                     / (rank * k[0] * k[1]) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_channels, **place)) if bias else None

    @staticmethod
    def max_rank(in_channels, out_channels, k):
        return min(in_channels, out_channels * k[0] * k[1])

    def forward(self, x):
        return F.conv2d(F.conv2d(x, self.weight_a), self.weight_b, self.bias, self.stride,
                        self.padding, self.dilation)

    def dense_weight(self):
        return torch.einsum("frij,rc->fcij", self.weight_b, self.weight_a[:, :, 0, 0])

    def analytic_macs(self, input_shape):
        h, w = input_shape[-2:]
        ho, wo = (F.conv2d(torch.empty(1, 1, h, w, device="meta"),
                           torch.empty(1, 1, *self.weight_b.shape[2:], device="meta"),
                           None, self.stride, self.padding, self.dilation).shape[2:])
        c = self.weight_a.shape[1]
        return h * w * c * self.rank + ho * wo * self.weight_b[0].numel() * len(self.weight_b)

    @classmethod
    def from_conv(cls, conv, rank):
        w = conv.weight.detach()
        f, c, kh, kw = w.shape
        layer = cls(c, f, (kh, kw), rank, conv.stride, conv.padding, conv.dilation,
                    conv.bias is not None, device=w.device, dtype=w.dtype)
        p, s, qh = torch.linalg.svd(w.permute(0, 2, 3, 1).reshape(f * kh * kw, c).double(),
                                    full_matrices=False)
        b = (p[:, :rank] * s[:rank]).reshape(f, kh, kw, rank).permute(0, 3, 1, 2)
        with torch.no_grad():
            layer.weight_b.copy_(b)
            layer.weight_a.copy_(qh[:rank, :, None, None])
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer


register_layer_kind("{name}", conv=PointwiseFirst)
'''

PATTERN = "features.conv[2-5]"
YAML = f"""
# the throwaway kind on convs 2-5 at a quarter of their weights, fitted to the dense ones
"{PATTERN}": {{kind: NAME, module: MODULE, param_ratio: 0.25, init: dense}}
"""


@pytest.fixture
def pointwise(tmp_path, monkeypatch, request, tiny_data) -> Iterator[tuple[str, list[str]]]:
    """(kind name = module name, overrides selecting its layers YAML) written into tmp_path."""
    name = f"pw_{request.node.name.split('[')[0][-20:]}"
    (tmp_path / f"{name}.py").write_text(MODULE.replace("{name}", name))
    (tmp_path / "conf" / "layers").mkdir(parents=True)
    (tmp_path / "conf" / "layers" / f"{name}.yaml").write_text(
        textwrap.dedent(YAML.replace("NAME", name).replace("MODULE", name)))
    monkeypatch.syspath_prepend(str(tmp_path))  # the module: importable, as on PYTHONPATH
    yield name, [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"layers={name}", *tiny_data]
    unregister_layer_kind(name)  # the registry is process-wide: leave it as found
    sys.modules.pop(name, None)


def _config(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_train(overrides), resolve=True)


def test_factorize_builds_the_new_kind(pointwise):
    name, _ = pointwise
    import_module(name)  # what a layers entry's `module:` does
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1, bias=True, dtype=torch.float64)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    layer = factorize(conv, name, rank=2)  # scratch init
    assert type(layer).__name__ == "PointwiseFirst" and layer.rank == 2
    with torch.no_grad():
        nn.init.normal_(layer.bias)
        want = F.conv2d(x, layer.dense_weight(), layer.bias, stride=2, padding=1)
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    # init=dense at the full rank min(C, F*k*k) = 6 reproduces the conv (SVD, float64)
    full = factorize(conv, name, rank=6, init="dense")
    with torch.no_grad():
        torch.testing.assert_close(full(x), conv(x), rtol=1e-10, atol=1e-10)
    # the budget search is the factory's: the largest rank within it, params 6r + 72r = 78r
    assert factorize(conv, name, param_ratio=200 / conv.weight.numel()).rank == 200 // 78
    with pytest.raises(FactorizationError, match=r"^Conv2d\(6->8, 3x3\): .* refused .*"
                                                 r"blocker: rank"):
        factorize(conv, name, rank=7)
    with pytest.raises(FactorizationError, match=r"does not apply to a Linear"):
        factorize(nn.Linear(4, 4), name, rank=1)
    with pytest.raises(FactorizationError, match=r"blocker: groups=2"):
        factorize(nn.Conv2d(4, 4, 3, groups=2), name, rank=1)


def test_surgery_swaps_the_matched_convs(pointwise):
    name, overrides = pointwise
    cfg = _config(overrides)
    model = build_model_from_config(cfg["model"], 10, 3, 32).double().eval()
    dense = {n: model.get_submodule(f"features.conv{n}") for n in range(2, 6)}
    rows = {r.name: r for r in apply_surgery(model, cfg["layers"], (1, 3, 32, 32))}
    assert list(rows) == [f"features.conv{n}" for n in range(2, 6)]
    # conv2 (4->16, 3x3): even rank 1 costs 4 + 144 > 576 / 4 weights: left dense
    assert rows["features.conv2"].status == "left dense"
    assert "blocker: budget" in rows["features.conv2"].reason
    assert model.features.conv2 is dense[2]
    for n, rank in ((3, 1152 // (16 + 288)), (4, 2304 // (32 + 288)), (5, 2304 // (32 + 288))):
        row, new = rows[f"features.conv{n}"], model.get_submodule(f"features.conv{n}")
        assert (row.status, row.kind, row.detail) == ("swapped", name, f"rank {rank}")
        assert type(new).__name__ == "PointwiseFirst"
        # the SVD fit is optimal: its error is the tail of the singular values
        w = dense[n].weight.detach()
        s = torch.linalg.svdvals(w.permute(0, 2, 3, 1).reshape(-1, w.shape[1]))
        optimal = math.sqrt((s[rank:] ** 2).sum() / (s ** 2).sum())
        assert row.fit_error == pytest.approx(optimal, rel=1e-9)
        assert relative_fit_error(dense[n], new) == pytest.approx(optimal, rel=1e-9)


def test_the_schema_imports_the_module_and_checks_the_kind(pointwise):
    name, overrides = pointwise
    cfg = _config(overrides)
    assert name not in layer_kinds()  # nothing imported the module yet
    check_train_config(cfg)  # the schema imports `module:`, then knows the kind
    assert name in layer_kinds()
    kinds = ", ".join(map(repr, layer_kinds()))
    cfg["layers"][PATTERN]["kind"] = "no_such_kind"
    with pytest.raises(ConfigError, match=rf"^layers\.features\.conv\[2-5\]\.kind: expected one "
                                          rf"of {kinds}, got 'no_such_kind'$"):
        check_train_config(cfg)
    cfg["layers"][PATTERN].update(kind=name, module="no_such_module_x")
    with pytest.raises(ConfigError, match=r"^layers\.features\.conv\[2-5\]\.module: cannot "
                                          r"import 'no_such_module_x' \(.*\); put the folder"):
        check_train_config(cfg)


def test_registry_refusals(pointwise):
    name, _ = pointwise
    module = import_module(name)
    with pytest.raises(ValueError, match=r"^layer kind 'cp' is kron's own"):
        unregister_layer_kind("cp")
    with pytest.raises(ValueError, match=rf"^layer kind {name!r} is registered twice"):
        register_layer_kind(name, conv=nn.Conv2d)
    register_layer_kind(name, conv=module.PointwiseFirst)  # the same class again: a no-op
    with pytest.raises(ValueError, match=r"give a linear and/or a conv class"):
        register_layer_kind("nothing")
