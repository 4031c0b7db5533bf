"""Layer surgery: every kind on every baseline gives the analytic parameter counts; errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from kron.layers import FactorizationError
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
    table = format_table(rows).splitlines()
    assert "features.conv3" in table[3] and table[-3].startswith("total (6 swapped, 0 left")
    p0, p1 = sum(r.params_before for r in rows), sum(r.params_after for r in rows)
    m0, m1 = sum(r.macs_before for r in rows), sum(r.macs_after for r in rows)
    assert table[-2] == (f"ratio: params {p0 / p1:.2f}x, MACs {m0 / m1:.2f}x (matched layers, "
                         "dense / after)") and table[-1] == "left dense: 0 (none)"


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
    ({"features.conv9": {"kind": "cp", "rank": 2}},
     r"matches no Linear/Conv2d.*features\.conv3 Conv2d"),
    ({"features.bn1": {"kind": "cp", "rank": 2}}, r"is a BatchNorm2d"),
    ({"features.conv3": {"kind": "kron"}}, r"exactly one of 'terms'"),
    ({"features.conv3": {"kind": "kron", "terms": [[4, 4, 1, 1]], "rnk": 2}}, r"unknown keys"),
    ({"features.conv3": {"kind": "svd"}}, r"kind must be one of"),
    ({"features.conv3": {"kind": "kron", "terms": [[4, 4, 1, 1]], "init": "warm"}},
     r"init must be one of"),
])
def test_spec_mistakes_always_refuse(spec, match):
    model = build_model("svhn", width=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        apply_surgery(model, spec, (1, 3, 32, 32))
    assert same_state(model, before)


LAYER_MISFITS = [
    ({"features.conv3": {"kind": "kron", "terms": [[5, 5, 1, 1]]}},
     r"features\.conv3 Conv2d\(32->64, 3x3\): .*nearest valid.*blocker: shape"),
    ({"features.conv3": {"kind": "lowrank", "rank": 2}}, r"valid kinds here: \['dense', 'kron'"),
    ({"classifier.fc1": {"kind": "cp", "rank": 2}}, r"Linear\(1024->512\).*valid kinds"),
    ({"features.conv3": {"kind": "cp", "param_ratio": 1e-4}},
     r"blocker: budget.*smallest achievable param_ratio"),
]


@pytest.mark.parametrize("spec,match", LAYER_MISFITS)
def test_layer_that_cannot_meet_its_entry_stays_dense_or_refuses_strictly(spec, match):
    model = build_model("svhn", width=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"surgery refused \(strict\), model unchanged: 1 "
                       r"layer\(s\) cannot meet the spec: .*" + match):
        apply_surgery(model, spec, (1, 3, 32, 32), strict=True)
    assert same_state(model, before)
    rows = apply_surgery(model, spec, (1, 3, 32, 32))
    assert same_state(model, before) and [r.status for r in rows] == ["left dense"]
    assert rows[0].kind == "dense" and rows[0].params_after == rows[0].params_before
    assert re.search(match, f"{rows[0].name} {rows[0].shape}: {rows[0].reason}")
    assert format_table(rows).splitlines()[-1].endswith(f"(kind {rows[0].requested}): "
                                                        + rows[0].reason)


def same_state(model: nn.Module, before: dict) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                 for k, v in before.items())


def test_surgery_finishes_or_changes_nothing():
    """The 3rd matched layer cannot meet its budget: strict leaves the model's state exactly as
    it was; non-strict converts the others and reports that one."""
    model = build_model("svhn", width=0.25)
    spec = {"features.conv[2-5]": {"kind": "separable", "param_ratio": 0.2},
            "features.conv4": {"kind": "cp", "param_ratio": 1e-4}}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FactorizationError, match=r"1 layer\(s\).*features\.conv4 "):
        apply_surgery(model, spec, (1, 3, 32, 32), strict=True)
    assert same_state(model, before)
    assert all(type(model.get_submodule(f"features.conv{i}")) is nn.Conv2d for i in range(1, 6))
    rows = apply_surgery(model, spec, (1, 3, 32, 32))
    assert [r.status for r in rows] == ["swapped", "swapped", "left dense", "swapped"]
    assert [type(model.get_submodule(f"features.conv{i}")).__name__ for i in range(2, 6)] == [
        "SeparableConv2d", "SeparableConv2d", "Conv2d", "SeparableConv2d"]
    torch.testing.assert_close(model.features.conv4.weight, before["features.conv4.weight"])


class Attention(nn.Module):
    """A block whose projections are read without a call, as in torchvision's swin_t and
    nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        q, k, v = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, -1)
        y = self.mha(q, k, v, need_weights=False)[0]
        return self.head(y)


def test_weights_read_without_a_call_are_listed_and_attention_is_factored():
    torch.manual_seed(0)
    model = Attention().to(torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = model(x)
    mha_in = model.mha.in_proj_weight.numel() + model.mha.in_proj_bias.numel()
    rows = apply_surgery(model, {"*": {"kind": "lowrank", "param_ratio": 0.5, "init": "dense"},
                                 "mha.out_proj": {"kind": "lowrank", "rank": 16,
                                                  "init": "dense"}}, (1, 5, 16))
    by_name = {r.name: r for r in rows}
    assert list(by_name) == ["qkv", "mha", "mha.out_proj", "head"]
    qkv = by_name["qkv"]
    assert qkv.status == "left dense" and "never called" in qkv.reason
    assert type(model.qkv) is nn.Linear
    # the attention's packed E -> 3E projection: rank r costs r (16 + 48) <= 0.5 * 768 -> 6
    mha = by_name["mha"]
    assert mha.status == "swapped" and mha.detail == "rank 6" and mha.params_before == mha_in
    assert type(model.mha).__name__ == "ProjectedMultiheadAttention"
    assert model.mha.in_proj.rank == 6 and model.mha.out_proj.rank == 16  # full rank: exact
    assert by_name["mha.out_proj"].fit_error < 1e-12
    # the factored attention computes what the dense one does with the fitted in_proj
    with torch.no_grad():
        dense = nn.MultiheadAttention(16, 2, batch_first=True).to(torch.float64)
        dense.in_proj_weight.copy_(model.mha.in_proj.dense_weight())
        dense.in_proj_bias.copy_(model.mha.in_proj.bias)
        dense.out_proj.load_state_dict({"weight": model.mha.out_proj.dense_weight(),
                                        "bias": model.mha.out_proj.bias})
        q, k, v = torch.nn.functional.linear(x, model.qkv.weight, model.qkv.bias).chunk(3, -1)
        want = model.head(dense(q, k, v, need_weights=False)[0])
    out = model(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, ref)  # rank 6 of 16 changed the function
    out.sum().backward()
    table = format_table(rows).splitlines()
    assert table[-2] == "left dense: 1" and table[-1].startswith("  qkv Linear(16->48)")


def test_init_dense_rows_carry_the_fit_error():
    model = build_model("svhn", width=0.25)
    rows = apply_surgery(model, {"classifier.fc1": {"kind": "lowrank", "rank": 16,
                                                    "init": "dense"},
                                 "classifier.fc2": {"kind": "lowrank", "rank": 16}},
                         (1, 3, 32, 32))
    assert 0 < rows[0].fit_error < 1 and rows[1].fit_error is None


def test_every_layer_listed():
    names = list(replaceable_layers(build_model("hwdb", width=0.125, input_size=64,
                                                in_channels=1)))
    assert names[0] == "features.conv1" and names[-1] == "classifier.out" and len(names) == 8
