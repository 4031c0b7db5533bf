"""kron-compress: reports, fit errors equal to the optimal ones, files that reload to the same
outputs, layers left dense with their reasons, on several torchvision architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kron import compress as kc
from kron import model_source


@pytest.fixture(autouse=True)
def _no_machine_calibration(tmp_path, monkeypatch):
    """The entrypoints load ~/.cache/kron's calibration if present: not in tests."""
    monkeypatch.setenv("KRON_CALIBRATION_DIR", str(tmp_path / "calibration"))


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _round_trip(tmp_path, built: model_source.Built, report: kc.Report, shape) -> None:
    """The saved file rebuilds a net with the same outputs (the same layers and weights run
    the same float32 ops, so the outputs agree to the last bits)."""
    path = kc.save(tmp_path / "net.pt", built.model, report, built.source, shape)
    x = torch.randn(2, *shape[1:])
    again = kc.load(path)
    assert [type(m).__name__ for m in again.modules()] == [
        type(m).__name__ for m in built.model.modules()]
    torch.testing.assert_close(_eval(again, x), _eval(built.model, x), rtol=1e-6, atol=1e-6)


def _rearranged(w: torch.Tensor, m1: int, n1: int) -> torch.Tensor:
    """Van Loan's rearrangement: W = A (x) B  <=>  R(W) = vec(A) vec(B)^T."""
    m, n = w.shape
    m2, n2 = m // m1, n // n1
    return w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def _optimal(s: torch.Tensor, keep: int, w: torch.Tensor) -> float:
    return float(s[keep:].square().sum().sqrt() / w.norm())


def test_fit_errors_are_the_optimal_ones():
    """init fit: a one-term Kronecker layer and a rank-r low-rank layer are the best
    approximations of their form, so the reported error is the tail of the singular values
    (of the rearranged weight, resp. of the weight itself), computed here in float64. The
    layers are fitted in float32: their error exceeds the optimum by float32 rounding
    (~1e-7 of ||W||), hence rel=1e-5."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24))
    w0, w2 = (model[i].weight.detach().double().clone() for i in (0, 2))
    spec = {"0": {"kind": "kron", "terms": [[4, 8]], "init": "fit"},
            "2": {"kind": "lowrank", "rank": 5, "init": "fit"}}
    report = kc.compress(model, spec, (1, 64))
    kron_row, low_row = report.rows
    want_kron = _optimal(torch.linalg.svdvals(_rearranged(w0, 4, 8)), 1, w0)
    want_low = _optimal(torch.linalg.svdvals(w2), 5, w2)
    assert kron_row.fit_error == pytest.approx(want_kron, rel=1e-5)
    assert low_row.fit_error == pytest.approx(want_low, rel=1e-5)
    assert 0.5 < want_kron < 1 and 0.1 < want_low < 1  # random weights: far from exact
    assert report.spec == {"0": {"kind": "kron", "terms": [[4, 8]], "implementation": "auto"},
                           "2": {"kind": "lowrank", "rank": 5}}


def test_exact_structure_fits_with_zero_error():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    with torch.no_grad():
        lin.weight.copy_(torch.kron(torch.randn(3, 4), torch.randn(4, 4)))
    report = kc.compress(nn.Sequential(lin), {"0": {"kind": "kron", "terms": [[3, 4]],
                                                    "init": "fit"}}, (1, 16))
    assert report.rows[0].fit_error < 1e-6


def test_resnet18_at_a_budget_reports_and_reloads(tmp_path):
    built = model_source.build("resnet18")
    shape = (1, 3, 32, 32)
    params = sum(p.numel() for p in built.model.parameters())
    report = kc.compress(built.model, {"*": {"kind": "kron", "param_ratio": 0.1,
                                             "init": "fit"}}, shape)
    assert report.params[0] == params == 11_689_512
    assert report.params[1] == sum(p.numel() for p in built.model.parameters()) < params // 5
    assert len(report.rows) == 21  # 20 convs and the classifier
    for row in report.rows:
        assert (row.left_dense is None) == (row.fit_error is not None)
        if row.left_dense is None:
            assert 0 < row.fit_error < 1.5 and row.name in report.spec
    text = kc.format_report(report)
    assert text.splitlines()[0].split() == ["layer", "kind", "shape", "detail", "params", "->",
                                            "MACs/img", "->", "fit", "err"]
    assert "total: params 11,689,512 -> " in text
    _round_trip(tmp_path, built, report, shape)


def test_mobilenet_layers_that_cannot_be_swapped_stay_dense_with_a_reason(tmp_path):
    """Every matched layer is either swapped (fit error reported, same weight shape) or left
    dense with a reason; the net still runs and reloads. (Today the depthwise convs stay dense;
    once the surgery factors grouped convs they may be swapped: both pass.)"""
    built = model_source.build("mobilenet_v3_small")
    shape = (1, 3, 32, 32)
    x = torch.randn(2, *shape[1:])
    report = kc.compress(built.model, {"*": {"kind": "kron", "param_ratio": 0.1,
                                             "init": "fit"}}, shape)
    grouped = {n for n, m in model_source.build("mobilenet_v3_small").model.named_modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1}
    by_name = {r.name: r for r in report.rows}
    assert grouped <= set(by_name) and len(grouped) == 11
    for row in report.rows:
        if row.left_dense is None:
            assert row.fit_error is not None
        else:
            assert row.left_dense.strip() and row.params_after == row.params_before
            assert isinstance(built.model.get_submodule(row.name), nn.Conv2d | nn.Linear)
    assert "left dense" in kc.format_report(report) or not any(r.left_dense for r in report.rows)
    assert _eval(built.model, x).shape == (2, 1000)
    _round_trip(tmp_path, built, report, shape)


def test_spec_for_non_grouped_convs_swaps_them_all():
    built = model_source.build("mobilenet_v3_small")
    report = kc.compress(built.model, {"features.[2-9].block.0.0": {  # expansion 1x1 convs
        "kind": "kron", "param_ratio": 0.25, "init": "fit"}}, (1, 3, 32, 32))
    assert len(report.rows) == 8 and all(r.left_dense is None for r in report.rows)


@pytest.mark.slow
def test_vit_transformer_compresses_and_reloads(tmp_path):
    built = model_source.build("vit_b_16", {"image_size": 32})
    assert built.input_shape == (1, 3, 32, 32)
    report = kc.compress(built.model, {"*": {"kind": "kron", "param_ratio": 0.1,
                                             "init": "fit"}}, built.input_shape)
    mlp = [r for r in report.rows if ".mlp." in r.name]
    assert len(mlp) == 24 and all(r.left_dense is None for r in mlp)
    _round_trip(tmp_path, built, report, built.input_shape)


def test_cli_prints_the_report_and_writes_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(model_source.build("resnet18").model.state_dict(), weights)
    assert kc.main(["torchvision.models:resnet18", "--weights", str(weights),
                    "--input-size", "32", "--param-ratio", "0.2", "--kind", "kron"]) == 0
    out = capsys.readouterr().out
    assert "total: params 11,689,512 -> " in out and "fc" in out
    saved = tmp_path / "torchvision_models_resnet18-compressed.pt"
    assert f"wrote {saved.name}" in out and saved.is_file()
    content = kc.read(saved)
    assert content["source"]["kind"] == "callable" and content["input_shape"] == [1, 3, 32, 32]
    assert {r["name"] for r in content["report"]} >= {"conv1", "fc"}


@pytest.mark.parametrize("argv, message", [
    (["resnet1", "--param-ratio", "0.1"], "did you mean resnet18"),
    (["resnet18"], "give a budget"),
    (["resnet18", "--param-ratio", "0.1", "--layers", "x.yaml"], "not both"),
    (["resnet18", "--param-ratio", "0.1", "--model-arg", "num_classes"], "KEY=VALUE"),
    (["nosuchpkg.mod:build", "--param-ratio", "0.1"], "cannot import"),
])
def test_cli_bad_input_is_one_line(argv, message, capsys):
    assert kc.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_weights_that_do_not_fit_are_named(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"model": nn.Linear(3, 4).state_dict()}, path)
    model = model_source.build("resnet18").model
    with pytest.raises(model_source.SourceError, match="missing keys"):
        model_source.load_weights(model, model_source.read_state_dict(path), str(path))


def test_layers_yaml_spec(tmp_path):
    spec = tmp_path / "layers.yaml"
    spec.write_text('"layer1.*.conv1": {kind: tucker, ranks: [16, 16]}\nfc: {kind: lowrank, '
                    "rank: 8}\nlayer2.0.conv2: {kind: kron, terms: [[8, 8, 1, 1], [8, 8, 1, 1], "
                    "[4, 4, 3, 3]]}\n")
    args = kc.build_parser().parse_args(["resnet18", "--layers", str(spec), "--init", "scratch"])
    assert kc.spec_from_args(args) == {
        "layer1.*.conv1": {"init": "scratch", "kind": "tucker", "ranks": [16, 16]},
        "fc": {"init": "scratch", "kind": "lowrank", "rank": 8},
        "layer2.0.conv2": {"init": "scratch", "kind": "kron",
                           "terms": [[8, 8, 1, 1], [8, 8, 1, 1], [4, 4, 3, 3]]}}
    built = model_source.build("resnet18")
    report = kc.compress(built.model, kc.spec_from_args(args), (1, 3, 32, 32))
    assert [r.name for r in report.rows] == ["layer1.0.conv1", "layer1.1.conv1",
                                             "layer2.0.conv2", "fc"]
    assert all(r.fit_error is None for r in report.rows)  # scratch: nothing fitted
    assert report.spec["layer2.0.conv2"]["terms"] == [[8, 8, 1, 1], [8, 8, 1, 1], [4, 4, 3, 3]]
    _round_trip(tmp_path, built, report, (1, 3, 32, 32))  # two shape groups, one of rank 2
