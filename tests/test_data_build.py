"""Data configs compose, and build_datasets turns each into normalised (train, test) datasets."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kron.paths import CONFIG_DIR
from kron.data import DatasetError, build_datasets, build_loader, build_transform
from kron.data.hwdb import convert
from kron.data.synthetic import (
    random_gnt_records,
    write_chars74k,
    write_gnt,
    write_icdar03,
    write_imagenet,
)

CONFIGS = CONFIG_DIR / "data"
NAMES = ["svhn", "synth_svhn", "hwdb", "icdar03", "chars74k", "imagenet"]


def _cfg(name, **overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=[f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize("name", NAMES)
def test_every_config_composes_with_required_keys(name):
    cfg = _cfg(name)
    assert cfg.name == name
    for key in ("num_classes", "in_channels", "input_size", "transforms", "loader"):
        assert key in cfg
    assert len(cfg.transforms.mean) == len(cfg.transforms.std) == cfg.in_channels
    assert cfg.loader.num_workers == 2 and cfg.loader.persistent_workers
    assert cfg.loader.pin_memory == "auto"
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert str(cfg.get("root", cfg.get("path"))).startswith("data/")


def test_synth_svhn_generated_on_first_use(tmp_path):
    cfg = _cfg("synth_svhn", root=tmp_path / "s", **{"synth.n_train": 64, "synth.n_test": 32})
    train, test = build_datasets(cfg)
    assert (len(train), len(test)) == (64, 32) and train.classes == list("0123456789")
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
    batch = torch.stack([test[i][0] for i in range(32)])
    assert abs(batch.mean().item()) < 0.5 and 0.6 < batch.std().item() < 1.5  # normalised
    test_raw = test.data[0].float() / 255
    mean = torch.tensor(cfg.transforms.mean)[:, None, None]
    std = torch.tensor(cfg.transforms.std)[:, None, None]
    assert torch.allclose(test[0][0], (test_raw - mean) / std, atol=1e-5)  # test: no augment
    loader = build_loader(train, cfg, train=True, batch_size=16)
    assert loader.num_workers == 2 and loader.persistent_workers and loader.drop_last
    assert loader.pin_memory == torch.cuda.is_available()
    xb, yb = next(iter(build_loader(test, {"loader": {"num_workers": 0}}, train=False,
                                    batch_size=8)))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.int64


def test_hwdb_config(tmp_path):
    write_gnt(tmp_path / "a.gnt", random_gnt_records(6, seed=0, max_side=50))
    for split in ("train", "test"):
        convert([tmp_path / "a.gnt"], tmp_path / "h.h5", split, progress=False)
    train, test = build_datasets(_cfg("hwdb", path=tmp_path / "h.h5"))
    assert train[0][0].shape == (1, 64, 64) and len(test) == 6
    assert train[0][0].max() <= 1.0 and train[0][0].min() >= -1.0


def test_scene_text_configs(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (20, 14, 3), dtype=np.uint8)
    for sub in ("train", "test"):
        write_icdar03(tmp_path / "icdar" / sub, [(img, c) for c in "0123456789"], ext="png")
    train, _ = build_datasets(_cfg("icdar03", root=tmp_path / "icdar", num_classes=62))
    assert train[0][0].shape == (1, 32, 32)
    write_chars74k(tmp_path / "c74k", {k: [img] * 4 for k in range(62)})
    train, test = build_datasets(_cfg("chars74k", root=tmp_path / "c74k", case_sensitive=False,
                                      num_classes=36))
    assert (len(train), len(test), len(train.classes)) == (186, 62, 36)
    with pytest.raises(DatasetError, match="data.num_classes=62 but the data has 36 classes"):
        build_datasets(_cfg("chars74k", root=tmp_path / "c74k", case_sensitive=False))


def test_imagenet_config_standard_transforms(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for split in ("train", "val"):
        write_imagenet(tmp_path, split, {"n01": [img], "n02": [img]})
    train, test = build_datasets(_cfg("imagenet", root=tmp_path, num_classes=2))
    assert train[0][0].shape == test[1][0].shape == (3, 224, 224)


def test_config_shape_mismatch_and_unknown_name(tmp_path):
    cfg = _cfg("synth_svhn", root=tmp_path, input_size=28,
               **{"synth.n_train": 8, "synth.n_test": 8})
    with pytest.raises(DatasetError, match=r"shape \(3, 32, 32\).*\(3, 28, 28\)"):
        build_datasets(cfg)
    with pytest.raises(DatasetError, match="unknown dataset name 'mnist'"):
        build_datasets({"name": "mnist"})


def test_missing_real_svhn_points_to_synth(tmp_path):
    with pytest.raises(DatasetError, match="ufldl.*data=synth_svhn.*data/README.md"):
        build_datasets(_cfg("svhn", root=tmp_path))


def test_transform_pipeline_order():
    t = build_transform({"mean": [0.5], "std": [0.5], "grayscale": True,
                         "train": {"resize": [40, 40], "random_crop": 32, "padding": 4,
                                   "hflip": True}}, train=True)
    out = t(torch.full((3, 50, 60), 255, dtype=torch.uint8))
    assert out.shape == (1, 32, 32) and out.dtype == torch.float32
    assert abs(out.max().item() - 1.0) < 1e-3  # white stays white (grey applied on floats)
