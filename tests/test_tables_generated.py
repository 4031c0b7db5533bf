"""The tables ``kron-tables sweep`` and ``frontier`` generate (table.yaml, every preset YAML,
the point ids) are pinned byte for byte: tests/data/generated_tables.json holds what commit
f9bb405 wrote for the same command lines, with the output folder written as <OUT> and the
group's rename applied (``configs/experiment`` -> ``configs/preset``, the row field and the
``/preset@_here_`` default: the only difference in the files, checked when it was renamed), and
regenerated once for a deliberate change: frontier Kronecker entries carry ``shape_rule``
(docs/design.md, D11), which also changes the left-out points' smallest achievable shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kron.tables.cli import main

GOLDEN = Path(__file__).parent / "data" / "generated_tables.json"
#: name -> a kron-tables command line (dry runs: they write the table, train nothing)
CASES = {
    "sweep_two_layers_rank2": [
        "sweep", "g", "--layer", "classifier.fc2", "--layer", "features.conv3",
        "--param-ratio", "0.03", "--mac-ratio", "0.1", "--rank", "2", "--max-points", "100",
        "layers=svhn_kron", "model.width=0.25"],
    "frontier_of_a_table": [
        "frontier", "svhn", "--families", "kron,cp,lowrank", "--param-ratios", "0.2,1e-6",
        "--seeds", "2", "model.width=0.25"],
    "frontier_of_a_model_mac": [
        "frontier", "resnet", "--families", "kron,lowrank,tucker", "--mac-ratios", "0.3",
        "--layers", "layer1.*", "data=synth_svhn"],
}


def generated(case: str, out: Path) -> dict[str, str]:
    """Every file one case's command writes under ``out``, by relative path, ``out`` replaced."""
    assert main([*CASES[case], "--out", str(out), "--dry-run"]) == 0
    return {str(p.relative_to(out)): p.read_text().replace(str(out.resolve()), "<OUT>")
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_tables_are_as_pinned(case, tmp_path, capsys):
    want = json.loads(GOLDEN.read_text())[case]
    got = generated(case, tmp_path)
    assert sorted(got) == sorted(want)
    for path, text in want.items():
        assert got[path] == text, path


def test_ids_and_layer_patterns():
    from kron.tables.frontier import point_id as frontier_id
    from kron.tables.generated import matching, slug
    from kron.tables.sweep import point_id as sweep_id

    assert slug("features.conv[345]") == "features_conv_345" and slug("1e-06") == "1e_06"
    assert sweep_id("classifier.fc1", (32, 64), 1) == "classifier_fc1__32x64"
    assert sweep_id("layer1.0.conv1", (4, 2, 1, 1), 2) == "layer1_0_conv1__4x2x1x1_r2"
    assert frontier_id("tucker", "mac_ratio", 1e-6) == "tucker_m1e_06"
    names = ["a.conv1", "a.conv2", "b.fc", "c.fc"]
    assert matching(names, ["*.fc", "a.conv2"]) == ["a.conv2", "b.fc", "c.fc"]  # names' order
    assert matching(names, ["a.conv[1]"]) == ["a.conv1"] and matching(names, ["z*"]) == []
