"""``"*"`` surgery of torchvision nets (random weights, small inputs) at param_ratio 0.1: it
finishes, every layer is either swapped within budget or listed as left dense with a reason, the
reported parameter totals are what the model lost, and the net runs forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kron.models.surgery import apply_surgery, format_table, surgery_targets

torchvision = pytest.importorskip("torchvision")

SPEC = {"*": {"kind": "kron", "param_ratio": 0.1}}


def own_params(m: nn.Module) -> int:
    """Parameters a surgery row of ``m`` accounts for (an attention module: its own, since its
    out_proj has a row of its own)."""
    return sum(p.numel() for p in m.parameters(recurse=not isinstance(m, nn.MultiheadAttention)))


def run_surgery(name: str, hw: int, **kwargs) -> tuple[nn.Module, list, dict]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    targets = surgery_targets(model)
    weights = {n: (m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else m.weight
                   ).numel() for n, m in targets.items()}
    total = sum(p.numel() for p in model.parameters())
    rows = apply_surgery(model, SPEC, (1, 3, hw, hw))
    assert [r.name for r in rows] == list(targets)  # every target reported, in model order
    # the reported totals are what the model lost
    lost = total - sum(p.numel() for p in model.parameters())
    assert lost == sum(r.params_before - r.params_after for r in rows)
    for r in rows:
        if r.status == "swapped":
            layer = model.get_submodule(r.name)
            layer = getattr(layer, "in_proj", layer)  # an attention's row: its in_proj
            bias = 0 if layer.bias is None else layer.bias.numel()
            assert r.params_after == own_params(layer)
            assert r.params_after - bias <= 0.1 * weights[r.name]
        else:
            assert r.status == "left dense" and r.kind == "dense" and r.reason
            assert r.params_after == r.params_before
    table = format_table(rows).splitlines()
    left = [r for r in rows if r.status == "left dense"]
    assert table[-1 - len(left)] == f"left dense: {len(left)}" + ("" if left else " (none)")
    assert table[-len(left) - 3].startswith(f"total ({len(rows) - len(left)} swapped")
    x = torch.randn(2, 3, hw, hw)
    out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.square().mean().backward()
    for r in rows:
        if r.status == "swapped":
            grads = [p.grad for p in model.get_submodule(r.name).parameters()]
            assert grads
            assert all(g is not None and torch.isfinite(g).all() for g in grads), r.name
    return model, rows, {r.name: r for r in rows}


def test_resnet18_converts_every_layer():
    _, rows, _ = run_surgery("resnet18", 32)
    assert all(r.status == "swapped" for r in rows) and len(rows) == 21
    torch.manual_seed(0)  # nothing left dense: strict surgery agrees
    net = torchvision.models.resnet18(weights=None)
    assert len(apply_surgery(net, SPEC, (1, 3, 32, 32), strict=True)) == 21


def test_mobilenet_v3_small_lists_what_stays_dense():
    model, rows, by_name = run_surgery("mobilenet_v3_small", 32)
    depthwise = by_name["features.1.block.0.0"]  # Conv2d(16, 16, 3, groups=16)
    # groups are factored per group now: a depthwise 3x3's block (1, 1, 3, 3) has 9 weights
    # and its smallest Kronecker term A (1, 1, 1, 3) (x) B (1, 1, 3, 1) has 6, so at 0.1 the
    # budget, not groups, keeps it dense
    assert depthwise.status == "left dense" and "blocker: budget" in depthwise.reason
    assert "smallest achievable param_ratio 0.6667" in depthwise.reason
    se = by_name["features.1.block.1.fc1"]  # Conv2d(16, 8, 1): 128 weights, >= 24 factored
    assert se.status == "left dense" and "smallest achievable param_ratio 0.1875" in se.reason
    assert sum(r.status == "swapped" for r in rows) >= 30
    fresh = torchvision.models.mobilenet_v3_small(weights=None)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"surgery refused \(strict\), model unchanged"):
        apply_surgery(fresh, SPEC, (1, 3, 32, 32), strict=True)
    after = fresh.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                 for k, v in before.items())


def test_regnet_x_400mf_grouped_convs():
    _, rows, by_name = run_surgery("regnet_x_400mf", 32)
    grouped = by_name["trunk_output.block1.block1-0.f.b.0"]  # groups=2
    assert grouped.status == "swapped" or "blocker: groups=2" in grouped.reason


@pytest.mark.slow
def test_vit_b_16_attention_is_factored():
    model, rows, by_name = run_surgery("vit_b_16", 32, image_size=32)
    attention = [r for r in rows if r.shape == "MultiheadAttention(768, 12 heads)"]
    assert len(attention) == 12 and all(r.status == "swapped" for r in rows)
    for r in attention:  # packed in_proj factored; out_proj, now called, too
        assert by_name[r.name + ".out_proj"].status == "swapped"
        assert r.params_before == 768 * 3 * 768 + 3 * 768
    total = sum(r.params_before for r in rows) / sum(r.params_after for r in rows)
    assert total > 9  # "every layer" at 0.1 compresses about 10x, attention included
    assert sum(p.numel() for p in model.parameters()) < 0.1 * 86_420_200


@pytest.mark.slow
def test_swin_t_projections_read_without_a_call_are_listed():
    _, _, by_name = run_surgery("swin_t", 32)
    qkv = by_name["features.1.0.attn.qkv"]  # read by shifted_window_attention, never called
    assert qkv.status == "swapped" or "never called" in qkv.reason
    assert by_name["features.1.0.mlp.0"].status == "swapped"


def test_resnet18_low_rank_fitted_from_dense_reports_fit_errors():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    spec = {"layer1.*": {"kind": "tucker", "param_ratio": 0.1, "init": "dense"},
            "fc": {"kind": "lowrank", "param_ratio": 0.1, "init": "dense"}}
    rows = apply_surgery(model, spec, (1, 3, 32, 32), strict=True)
    assert [r.kind for r in rows] == ["tucker"] * 4 + ["lowrank"]
    # random weights have a flat spectrum: a 10% budget keeps well under all of the energy
    assert all(0.3 < r.fit_error < 1 for r in rows)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
