"""SVHN .mat loader and the synthetic SVHN stand-in."""

import json

import numpy as np
import pytest
import scipy.io

from kron.config_compose import compose_train
from kron.data import SVHN, DatasetError
from kron.data.synth_svhn import render_split
from kron.data.synthetic import ensure_synth_svhn, main, write_svhn, write_synth_svhn


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)


def test_writer_loader_round_trip_exact(tmp_path):
    x, y = _images(25)
    y[:3] = 0  # digit 0 is stored as 10
    write_svhn(tmp_path, "train", x, y)
    raw = scipy.io.loadmat(tmp_path / "train_32x32.mat")
    assert raw["X"].shape == (32, 32, 3, 25) and raw["y"].shape == (25, 1)
    assert raw["y"][:3, 0].tolist() == [10, 10, 10] and raw["y"].min() >= 1
    ds = SVHN(tmp_path, "train", verify_md5=False)
    assert len(ds) == 25 and ds.classes == [str(d) for d in range(10)]
    for i in (0, 7, 24):
        img, label = ds[i]
        assert img.dtype.is_floating_point is False and img.shape == (3, 32, 32)
        assert np.array_equal(img.numpy(), x[i]) and label == y[i]
    assert isinstance(ds[0][1], int)


def test_train_plus_extra_concatenates(tmp_path):
    (xa, ya), (xb, yb) = _images(5, 1), _images(7, 2)
    write_svhn(tmp_path, "train", xa, ya)
    write_svhn(tmp_path, "extra", xb, yb)
    ds = SVHN(tmp_path, "train+extra", verify_md5=False)
    assert len(ds) == 12
    assert np.array_equal(ds[6][0].numpy(), xb[1]) and ds[6][1] == yb[1]


def test_md5_check_rejects_generated_file(tmp_path):
    write_svhn(tmp_path, "test", *_images(3))
    with pytest.raises(DatasetError, match=r"MD5 .*verify_md5=false"):
        SVHN(tmp_path, "test")
    assert len(SVHN(tmp_path, "test", verify_md5=False)) == 3


def test_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(DatasetError) as err:
        SVHN(tmp_path, "train", verify_md5=False)
    msg = str(err.value)
    assert str(tmp_path / "train_32x32.mat") in msg and "ufldl.stanford.edu" in msg
    assert "data/README.md" in msg and "\n" not in msg


def test_corrupt_mat_names_file(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(100))
    with pytest.raises(DatasetError, match="cannot read .*train_32x32.mat"):
        SVHN(tmp_path, "train", verify_md5=False)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"images": np.zeros(3)})
    with pytest.raises(DatasetError, match="no 'X' and 'y'"):
        SVHN(tmp_path, "test", verify_md5=False)


def test_unknown_split(tmp_path):
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        SVHN(tmp_path, "val")


def test_synth_is_deterministic_and_varied():
    a, ya = render_split(40, seed=3, split_index=0)
    b, yb = render_split(40, seed=3, split_index=0)
    c, _ = render_split(40, seed=4, split_index=0)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert not np.array_equal(a, c)
    assert a.shape == (40, 32, 32, 3) and a.dtype == np.uint8
    assert set(ya.tolist()) <= set(range(10)) and len(set(ya.tolist())) > 5
    assert a.std() > 30  # not blank


def test_synth_files_read_by_svhn_loader_and_cached(tmp_path):
    ensure_synth_svhn(tmp_path, n_train=30, n_test=10, seed=1)
    train = SVHN(tmp_path, "train", verify_md5=False)
    test = SVHN(tmp_path, "test", verify_md5=False)
    assert (len(train), len(test)) == (30, 10)
    x, y = render_split(30, seed=1, split_index=0)
    assert np.array_equal(train.data.numpy(), x.transpose(0, 3, 1, 2))
    assert train.targets.tolist() == y.tolist()
    mtime = (tmp_path / "train_32x32.mat").stat().st_mtime_ns
    ensure_synth_svhn(tmp_path, n_train=30, n_test=10, seed=1)  # cached: untouched
    assert (tmp_path / "train_32x32.mat").stat().st_mtime_ns == mtime
    ensure_synth_svhn(tmp_path, n_train=20, n_test=10, seed=1)  # settings changed: regenerated
    assert len(SVHN(tmp_path, "train", verify_md5=False)) == 20
    # the test split does not depend on the training size
    assert np.array_equal(SVHN(tmp_path, "test", verify_md5=False).data, test.data)
    assert json.loads((tmp_path / "synth_svhn.json").read_text())["n_train"] == 20


def test_synth_cli(tmp_path, capsys):
    assert main(["svhn", "--out", str(tmp_path), "--n-train", "12", "--n-test", "4",
                 "--seed", "5"]) == 0
    assert "wrote 12 train + 4 test" in capsys.readouterr().out
    ref = tmp_path / "ref"
    write_synth_svhn(ref, 12, 4, seed=5)
    got, want = SVHN(tmp_path, "train", verify_md5=False), SVHN(ref, "train", verify_md5=False)
    assert np.array_equal(got.data, want.data) and np.array_equal(got.targets, want.targets)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


@pytest.mark.slow
def test_synth_is_not_solved_in_one_epoch(tmp_path):
    """A small CNN trained one epoch on the default synthetic set stays far from 100%."""
    import torch
    from torch import nn

    ensure_synth_svhn(tmp_path)  # the default size: 6000 train, 2000 test
    train, test = SVHN(tmp_path, "train", verify_md5=False), SVHN(tmp_path, "test",
                                                                   verify_md5=False)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    x_all, y_all = train.data.float() / 255 - 0.5, train.targets
    for i in torch.randperm(len(train)).split(64):
        loss = nn.functional.cross_entropy(net(x_all[i]), y_all[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (net.eval()(test.data.float() / 255 - 0.5).argmax(1) == test.targets).float().mean()
    assert torch.isfinite(loss) and acc < 0.95


def test_synth_difficulty_levels(tmp_path):
    """easy is the default renderer; hard is harder by each of its knobs and has its
    own cache key; an unknown level is one clear error."""
    from kron.data.synth_svhn import LEVELS, Difficulty, difficulty

    assert difficulty("easy") == Difficulty() and difficulty(LEVELS["hard"]) is LEVELS["hard"]
    easy, ye = render_split(60, seed=2, split_index=1)
    again, _ = render_split(60, seed=2, split_index=1, level="easy")
    hard, yh = render_split(60, seed=2, split_index=1, level="hard")
    assert np.array_equal(easy, again) and np.array_equal(ye, yh)  # labels come first
    assert not np.array_equal(easy, hard)
    h = LEVELS["hard"]
    e = LEVELS["easy"]
    assert h.min_luma_gap < e.min_luma_gap and h.noise > e.noise and h.blur[1] > e.blur[1]
    assert h.neighbour_prob > e.neighbour_prob and h.gap[1] < e.gap[1] and h.blobs[1] > 0
    assert h.crop_scale[1] - h.crop_scale[0] > e.crop_scale[1] - e.crop_scale[0]
    # lower contrast: the mean absolute difference to each image's own mean is smaller
    spread = lambda x: np.abs(x - x.mean((1, 2, 3), keepdims=True)).mean()  # noqa: E731
    assert spread(hard.astype(float)) < spread(easy.astype(float))
    ensure_synth_svhn(tmp_path, n_train=6, n_test=4, seed=2, difficulty="hard")
    meta = json.loads((tmp_path / "synth_svhn.json").read_text())
    assert meta["difficulty"] == "hard"
    assert np.array_equal(SVHN(tmp_path, "test", verify_md5=False).data.numpy(),
                          render_split(4, 2, 1, "hard")[0].transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="unknown synthetic SVHN difficulty 'nope'"):
        ensure_synth_svhn(tmp_path / "x", n_train=6, n_test=4, difficulty="nope")
    assert not (tmp_path / "x").exists()  # nothing written


def test_synth_hard_config_composes():
    from omegaconf import OmegaConf

    cfg = compose_train(["data=synth_svhn_hard"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert data["synth"] == {"n_train": 6000, "n_test": 2000, "seed": 0, "difficulty": "hard"}
    assert data["root"].endswith("synth_svhn_hard") and data["name"] == "synth_svhn"


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_truncated_mat_is_one_line(tmp_path, keep):
    """A .mat cut short anywhere is one DatasetError line naming the file, not scipy's error."""
    path = write_svhn(tmp_path, "train", np.zeros((40, 3, 32, 32), np.uint8), [1] * 40)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(DatasetError, match=r"SVHN: cannot read .*train_32x32\.mat") as err:
        SVHN(tmp_path, "train", verify_md5=False)
    assert "\n" not in str(err.value)
