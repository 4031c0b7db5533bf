"""Layer surgery: every kind on every baseline gives the analytic parameter counts; errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kron.models import build_model
from kron.models.surgery import apply_surgery, format_table, replaceable_layers

NETS = {  # tiny variants: name -> (kwargs, input shape)
    "svhn": (dict(width=0.25), (1, 3, 32, 32)),
    "scenetext": (dict(width=0.25, in_channels=1, num_classes=62), (1, 1, 32, 32)),
    "hwdb": (dict(width=0.125, in_channels=1, num_classes=100, input_size=64), (1, 1, 64, 64)),
    "alexnet": (dict(width=0.125, num_classes=10), (1, 3, 64, 64)),
    "resnet": (dict(arch="resnet18", num_classes=16), (1, 3, 32, 32)),
}
CONV_TARGET = {"svhn": "features.conv3", "scenetext": "features.conv4", "hwdb": "features.conv4",
               "alexnet": "features.8", "resnet": "layer2.0.conv2"}
FC_TARGET = {"svhn": "classifier.fc1", "scenetext": "classifier.fc2", "hwdb": "classifier.fc1",
             "alexnet": "classifier.4", "resnet": "fc"}


def expected_params(kind: str, layer: nn.Module, **p) -> int:
    """Weight parameters of the replacement by formula, plus the dense layer's bias."""
    bias = 0 if layer.bias is None else layer.bias.numel()
    if kind == "kron":
        w = tuple(layer.weight.shape)
        p.pop("implementation", None)
        return bias + sum(math.prod(a) + math.prod(w) // math.prod(a) for a in p["terms"])
    if kind == "lowrank":
        return bias + p["rank"] * (layer.in_features + layer.out_features)
    f, c, kh, kw = layer.weight.shape
    r = p.get("rank")
    if kind == "separable":
        return bias + r * c * kh + f * r * kw
    if kind == "cp":
        return bias + r * (c + kh + kw + f)
    r_in, r_out = p["ranks"]
    return bias + c * r_in + r_in * r_out * kh * kw + r_out * f


def kron_terms(layer: nn.Module) -> list[tuple]:
    if isinstance(layer, nn.Linear):
        return [(2, 4), (4, 2)]
    f, c = layer.weight.shape[:2]
    return [(4, 4, 1, 1), (2, 2, 1, 3)]


CASES = [("kron", "conv"), ("kron", "fc"), ("lowrank", "fc"), ("separable", "conv"),
         ("cp", "conv"), ("tucker", "conv"), ("dense", "conv")]


@pytest.mark.parametrize("net,kind,where", [
    (n, k, w) for n in sorted(NETS) for k, w in CASES
    if n != "resnet" or k == "kron"  # torchvision's ResNet is slow to build: Kronecker only
])
def test_each_kind_on_each_baseline(net, kind, where):
    kwargs, shape = NETS[net]
    model = build_model(net, **kwargs)
    target = (CONV_TARGET if where == "conv" else FC_TARGET)[net]
    layer = model.get_submodule(target)
    spec = {"terms": kron_terms(layer), "implementation": "factored"} if kind == "kron" else (
        {"ranks": [3, 5]} if kind == "tucker" else {"rank": 3})
    total_before = sum(p.numel() for p in model.parameters())
    own_before = sum(p.numel() for p in layer.parameters())
    rows = apply_surgery(model, {target: {"kind": kind, **spec}}, shape)
    new = model.get_submodule(target)
    want = own_before if kind == "dense" else expected_params(kind, layer, **spec)
    assert sum(p.numel() for p in new.parameters()) == want
    assert sum(p.numel() for p in model.parameters()) == total_before - own_before + want
    assert rows[0].params_before == own_before and rows[0].params_after == want
    assert (new is layer) == (kind == "dense")
    out = model.eval()(torch.randn(2, *shape[1:]))
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_glob_override_order_and_table():
    model = build_model("svhn", width=0.5)
    spec = {"features.conv*": {"kind": "kron", "terms": [[16, 16, 1, 1]]},
            "features.conv1": {"kind": "dense"},
            "classifier.fc[12]": {"kind": "lowrank", "rank": 8}}
    rows = apply_surgery(model, spec, (1, 3, 32, 32))
    assert [r.name for r in rows] == ["features.conv1", "features.conv2", "features.conv3",
                                      "features.conv4", "features.conv5", "classifier.fc1",
                                      "classifier.fc2"]
    assert [r.kind for r in rows][:2] == ["dense", "kron"]
    assert type(model.features.conv1) is nn.Conv2d
    # conv3 (64->128 at 8x8): A (16,16,1,1), B (8,4,3,3); per position the B stage costs
    # C1 * F2*C2*9 MACs and the A stage F1*C1*F2
    assert rows[2].params_after == 16 * 16 + 8 * 4 * 9
    assert rows[2].macs_before == 128 * 64 * 9 * 8 * 8
    # A (16, 16, 1, 1) mixes channels first (cheaper here), then B (8, 4, 3, 3) convolves
    assert rows[2].macs_after == (16 * 16 * 4 + 16 * 8 * 4 * 9) * 8 * 8
    table = format_table(rows)
    assert "features.conv3" in table and table.splitlines()[-1].startswith("total")


def test_budget_targets():
    model = build_model("svhn", width=0.5)
    rows = apply_surgery(model, {
        "features.conv3": {"kind": "kron", "param_ratio": 0.05},
        "features.conv4": {"kind": "separable", "mac_ratio": 0.2},
        "classifier.fc1": {"kind": "lowrank", "param_ratio": 0.1},
    }, (1, 3, 32, 32))
    for r in rows:
        assert r.params_after < r.params_before
    conv4 = model.features.conv4
    fc1_rank = model.classifier.fc1.rank
    assert rows[1].macs_after <= 0.2 * rows[1].macs_before
    assert rows[2].params_after - 1024 <= 0.1 * 2048 * 1024 < rows[2].params_after - 1024 + 3072
    assert fc1_rank == (2048 * 1024 // 10) // (2048 + 1024)
    assert conv4.weight_vertical.shape[0] >= 1


def test_init_dense_recovers_exact_kronecker_weight():
    model = build_model("svhn", width=0.25).eval()
    conv = model.features.conv3  # 32 -> 64
    a, b = torch.randn(8, 8, 1, 1), torch.randn(8, 4, 3, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.kron(a, b))
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    apply_surgery(model, {"features.conv3": {"kind": "kron", "terms": [[8, 8, 1, 1]],
                                             "init": "dense"}}, (1, 3, 32, 32))
    assert type(model.features.conv3).__name__ == "KronConv2d"
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec,match", [
    ({"features.conv9": {"kind": "kron"}}, r"matches no Linear/Conv2d.*features\.conv3 Conv2d"),
    ({"features.bn1": {"kind": "kron"}}, r"is a BatchNorm2d"),
    ({"features.conv3": {"kind": "kron", "terms": [[5, 5, 1, 1]]}},
     r"features\.conv3 Conv2d\(32->64, 3x3\).*valid"),
    ({"features.conv3": {"kind": "lowrank", "rank": 2}}, r"valid kinds here: \['dense', 'kron'"),
    ({"classifier.fc1": {"kind": "cp", "rank": 2}}, r"Linear\(1024->512\).*valid kinds"),
    ({"features.conv3": {"kind": "kron"}}, r"exactly one of 'terms'"),
    ({"features.conv3": {"kind": "kron", "terms": [[4, 4, 1, 1]], "rnk": 2}}, r"unknown keys"),
    ({"features.conv3": {"kind": "svd"}}, r"kind must be one of"),
    ({"features.conv3": {"kind": "kron", "terms": [[4, 4, 1, 1]], "init": "fit"}}, r"init must"),
])
def test_errors_name_module_shape_and_choices(spec, match):
    with pytest.raises(ValueError, match=match):
        apply_surgery(build_model("svhn", width=0.25), spec, (1, 3, 32, 32))


def test_every_layer_listed():
    names = list(replaceable_layers(build_model("hwdb", width=0.125, input_size=64,
                                                in_channels=1)))
    assert names[0] == "features.conv1" and names[-1] == "classifier.out" and len(names) == 8
