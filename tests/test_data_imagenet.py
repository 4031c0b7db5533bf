"""ImageNet class folders, and sorting the flat validation folder from the devkit."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from kron.data import DatasetError, ImageNet
from kron.data.imagenet import sort_val
from kron.data.synthetic import write_imagenet, write_imagenet_flat_val

WNIDS = ["n01440764", "n01443537", "n01484850"]
REPO = Path(__file__).resolve().parents[1]


def _script(name):
    """Import scripts/<name>.py in-process (a subprocess would re-import torch: seconds)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _img(seed):
    return np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)


def test_folders_round_trip(tmp_path):
    samples = {w: [_img(10 * i + j) for j in range(2)] for i, w in enumerate(WNIDS)}
    write_imagenet(tmp_path, "train", samples, ext="png")
    ds = ImageNet(tmp_path, "train")
    assert ds.classes == WNIDS and len(ds) == 6
    img, label = ds[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 20, 24) and ds.classes[label] == WNIDS[1]
    assert np.array_equal(img.permute(1, 2, 0).numpy(), samples[WNIDS[1]][1])
    write_imagenet(tmp_path, "val", {WNIDS[0]: [_img(0)]})  # real .JPEG, decoded
    assert ImageNet(tmp_path, "val")[0][0].shape == (3, 20, 24)


def test_sort_flat_val_with_script(tmp_path, capsys):
    labels = [WNIDS[i % 3] for i in range(7)]
    write_imagenet_flat_val(tmp_path, tmp_path / "devkit", [(_img(i), w) for i, w in
                                                            enumerate(labels)], WNIDS)
    with pytest.raises(DatasetError, match=r"no class folders.*sort_imagenet_val\.py"):
        ImageNet(tmp_path, "val")
    assert sort_val(tmp_path / "val", tmp_path / "devkit", dry_run=True) == 7
    script = _script("sort_imagenet_val")
    assert script.main(["--val", str(tmp_path / "val"), "--devkit", str(tmp_path / "devkit")]) == 0
    assert "moved 7 images" in capsys.readouterr().out
    ds = ImageNet(tmp_path, "val")
    got = {Path(p).name: ds.classes[y] for p, y in ds.samples}
    assert got == {f"ILSVRC2012_val_{i:08d}.JPEG": w for i, w in enumerate(labels, start=1)}
    assert sort_val(tmp_path / "val", tmp_path / "devkit") == 0  # idempotent


def test_errors(tmp_path, capsys):
    with pytest.raises(DatasetError, match=r"expected .*train.*ILSVRC2012_img_train\.tar"):
        ImageNet(tmp_path, "train")
    with pytest.raises(DatasetError, match="unknown split"):
        ImageNet(tmp_path, "test")
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match=r"expected .*meta\.mat.*devkit"):
        sort_val(tmp_path / "val", tmp_path / "devkit")
    assert _script("sort_imagenet_val").main(["--val", str(tmp_path / "val"), "--devkit",
                                              str(tmp_path / "nodevkit")]) == 2
    assert capsys.readouterr().err.startswith("error: ImageNet: expected")
    write_imagenet(tmp_path, "train", {WNIDS[0]: [_img(0)]})
    (tmp_path / "train" / WNIDS[0] / "broken.JPEG").write_bytes(b"\xff\xd8\xff not a jpeg")
    ds = ImageNet(tmp_path, "train")
    with pytest.raises(DatasetError, match=r"cannot read .*broken\.JPEG"):
        ds[0]


@pytest.mark.parametrize("wnid", ["../escaped", "{abs}", "a/b", ".."])
def test_sort_refuses_wnid_that_leaves_val(tmp_path, capsys, wnid):
    """A meta.mat WNID that is not a plain folder name moves nothing and is one line."""
    val = tmp_path / "imagenet" / "val"
    wnid = wnid.format(abs=tmp_path / "abs_escape")
    samples = [(_img(0), wnid), (_img(1), WNIDS[0])]
    write_imagenet_flat_val(tmp_path / "imagenet", tmp_path / "devkit", samples,
                            [wnid, WNIDS[0]])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert _script("sort_imagenet_val").main(
        ["--val", str(val), "--devkit", str(tmp_path / "devkit")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"entry {wnid!r}" in err and "meta.mat" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_sort_os_error_is_one_line(tmp_path, capsys):
    """A class folder that cannot be made (a file is in the way) is one line naming it."""
    val = tmp_path / "imagenet" / "val"
    write_imagenet_flat_val(tmp_path / "imagenet", tmp_path / "devkit", [(_img(0), WNIDS[0])],
                            WNIDS[:1])
    (val / WNIDS[0]).write_text("in the way")
    assert _script("sort_imagenet_val").main(
        ["--val", str(val), "--devkit", str(tmp_path / "devkit")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot move into {val / WNIDS[0]}" in err
