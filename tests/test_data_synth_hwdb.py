"""Synthetic HWDB glyphs: class-dependent stroke patterns, written as real .gnt and HDF5."""

import numpy as np
import pytest
import torch

from kron.data import HWDB
from kron.data.gnt import iter_gnt, level1_codes
from kron.data.synth_hwdb import class_strokes, glyph_records
from kron.data.synthetic import main, random_gnt_records, write_gnt, write_synth_hwdb

K = 10


def _pixels(ds):
    x = np.stack([ds[i][0][0].numpy() for i in range(len(ds))]).astype(np.float64) / 255
    return x.reshape(len(ds), -1), ds.targets.numpy()


def _nearest_centroid_accuracy(train, test, labels):
    """Test accuracy of the per-class mean image of `train` (a linear template matcher)."""
    (xa, _), (xb, yb) = train, test
    cent = np.stack([xa[labels == k].mean(0) for k in range(K)])
    pred = ((xb[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yb).mean())


def test_patterns_depend_on_the_class_only():
    a, b = class_strokes(0xB0A1), class_strokes(0xB0A1)
    assert len(a) == len(b) and all(np.array_equal(s, t) for s, t in zip(a, b))
    c = class_strokes(0xB0A2)
    assert len(a) != len(c) or not all(np.array_equal(s, t) for s, t in zip(a, c))
    recs = glyph_records(30, seed=4, num_classes=K, sides=(20, 40))
    assert np.array_equal(np.bincount([int(np.searchsorted(level1_codes(), c)) for c, _ in recs]),
                          [3] * K)  # balanced over the first K level-1 codes
    again = glyph_records(30, seed=4, num_classes=K, sides=(20, 40))
    assert all(c == d and np.array_equal(x, y) for (c, x), (d, y) in zip(recs, again))
    assert all(20 <= s <= 40 for _, x in recs for s in x.shape)
    assert not np.array_equal(recs[0][1], glyph_records(30, 5, K, (20, 40))[0][1])


def test_learnable_by_a_template_matcher_but_not_trivially(tmp_path):
    """Chance is 1/K = 10 %. A nearest-centroid classifier on raw pixels gets 84.5 % here
    (seed 0): the classes carry signal, and the jitter keeps a template matcher well short of
    100 %. With the labels shuffled (what the old noise writer amounted to) it is near chance."""
    path = write_synth_hwdb(tmp_path / "h.h5", 400, 200, K, seed=0, size=32)
    train, test = HWDB(path, "train"), HWDB(path, "test")
    assert train.label_set == "all" and len(train.classes) == K == len(test.classes)
    assert train.codes == level1_codes()[:K].tolist()
    xa, ya = _pixels(train)
    xb = _pixels(test)
    assert 0.6 <= _nearest_centroid_accuracy((xa, ya), xb, ya) <= 0.97
    shuffled = np.random.default_rng(0).permutation(ya)
    assert _nearest_centroid_accuracy((xa, ya), xb, shuffled) <= 0.3


def test_gnt_writer_signature_and_cli(tmp_path, capsys):
    recs = random_gnt_records(6, seed=1, max_side=30)
    assert all(8 <= s <= 30 for _, x in recs for s in x.shape)
    write_gnt(tmp_path / "a.gnt", recs)
    assert [r.code for r in iter_gnt(tmp_path / "a.gnt")] == [c for c, _ in recs]
    assert main(["hwdb", "--out", str(tmp_path / "s.h5"), "--classes", "3", "--n-train", "9",
                 "--n-test", "6", "--size", "16"]) == 0
    assert "9 train + 6 test glyphs of 3 classes" in capsys.readouterr().out
    assert (len(HWDB(tmp_path / "s.h5", "train")), len(HWDB(tmp_path / "s.h5", "test"))) == (9, 6)
    with pytest.raises(ValueError, match="num_classes must be in 1..3755"):
        glyph_records(3, num_classes=0)


def test_synth_hwdb_config_draws_on_first_use_and_caches(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kron.config_schema import check_data_config
    from kron.data import build_datasets
    from kron.paths import CONFIG_DIR

    def cfg(**over):
        with initialize_config_dir(config_dir=str(CONFIG_DIR / "data"), version_base="1.3"):
            return compose("synth_hwdb", overrides=[f"{k}={v}" for k, v in over.items()])

    base = cfg()
    check_data_config(OmegaConf.to_container(base, resolve=True))
    assert base.name == "hwdb" and str(base.path).startswith("data/")
    small = {"path": tmp_path / "h.h5", "num_classes": 4, "input_size": 24,
             "synth.n_train": 12, "synth.n_test": 8}
    train, test = build_datasets(cfg(**small))
    assert (len(train), len(test), len(train.classes)) == (12, 8, 4)
    assert train[0][0].shape == (1, 24, 24) and train[0][0].dtype == torch.float32
    stamp = (tmp_path / "h.h5").stat().st_mtime_ns
    build_datasets(cfg(**small))
    assert (tmp_path / "h.h5").stat().st_mtime_ns == stamp  # same settings: kept
    assert len(build_datasets(cfg(**{**small, "synth.n_train": 16}))[0]) == 16  # redrawn
