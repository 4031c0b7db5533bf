"""Data configs compose, and build_datasets turns each into normalised (train, test) datasets."""


import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kron.config_schema import ConfigError, check_data_config
from kron.data import (
    DatasetError,
    build_datasets,
    build_loader,
    build_transform,
    dataset_names,
    set_epoch,
)
from kron.data.build import EpochSampler, SeededItems
from kron.data.hwdb import convert
from kron.data.synthetic import (
    random_gnt_records,
    write_chars74k,
    write_gnt,
    write_icdar03,
    write_imagenet,
)
from kron.distributed import DistContext
from kron.paths import CONFIG_DIR
from kron.recipe.settings import DataSettings
from kron.recipe.steps import Job, build_data

CONFIGS = CONFIG_DIR / "data"
OPTIONS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
#: every loader option (the schema requires each), as the data YAML files set them on a CPU
LOADER = {"num_workers": 0, "pin_memory": "auto", "persistent_workers": False}


def _cfg(name, **overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=[f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize("option", OPTIONS)
def test_every_config_matches_the_schema(option):
    cfg = _cfg(option)
    assert cfg.name in dataset_names()
    check_data_config(OmegaConf.to_container(cfg, resolve=True))
    assert len(cfg.transforms.mean) == len(cfg.transforms.std) == cfg.in_channels
    assert str(cfg.root if "root" in cfg else cfg.path).startswith("data/")


def test_every_registered_dataset_has_a_config():
    assert set(dataset_names()) == {_cfg(o).name for o in OPTIONS}


def test_synth_svhn_generated_on_first_use(tmp_path):
    cfg = _cfg("synth_svhn", root=tmp_path / "s", **{"synth.n_train": 64, "synth.n_test": 32})
    train, test = build_datasets(cfg)
    assert (len(train), len(test)) == (64, 32) and train.classes == list("0123456789")
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
    test_raw = test.data[0].float() / 255
    mean = torch.tensor(cfg.transforms.mean)[:, None, None]
    std = torch.tensor(cfg.transforms.std)[:, None, None]
    assert torch.allclose(test[0][0], (test_raw - mean) / std, atol=1e-5)  # test: no augment
    xb, yb = next(iter(build_loader(test, LOADER, train=False, batch_size=8)))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.int64
    assert torch.equal(xb[3], test[3][0])  # evaluation: in order, untransformed by seeds



def test_build_datasets_leaves_the_global_rng_alone(tmp_path):
    # the shape check runs one training item through the random crop; that draw must not move
    # the global stream, or building the data would change the model's init and dropout masks
    cfg = _cfg("synth_svhn", root=tmp_path / "s", **{"synth.n_train": 16, "synth.n_test": 8})
    assert cfg.transforms.train.random_crop  # the probe really draws
    build_datasets(cfg)  # renders the data once, outside the measured call
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    build_datasets(cfg)
    assert torch.equal(torch.random.get_rng_state(), before)

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
    with pytest.raises(ConfigError, match="^data.name: expected one of 'svhn', .* got 'mnist'"):
        build_datasets({"name": "mnist"})
    with pytest.raises(ConfigError, match="^data.verify_md5: missing required key$"):
        build_datasets({k: v for k, v in OmegaConf.to_container(cfg).items()
                        if k != "verify_md5"})


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


# ----------------------------------------------------------------------------- the loader
class Crops(torch.utils.data.Dataset):
    """Item i: a random crop offset drawn from the global torch RNG (as torchvision does)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        return torch.tensor([i, *torch.randint(0, 1000, (2,)).tolist()]), i


@pytest.mark.parametrize("workers,pin,persistent", [(0, False, True), (2, True, True),
                                                   (2, False, False), (1, "auto", True)])
def test_every_loader_option_reaches_the_loader(tmp_path, workers, pin, persistent):
    # through the recipe's data step, as training builds its loaders
    cfg = OmegaConf.merge(_cfg("synth_svhn", root=tmp_path, **{"synth.n_train": 16,
                                                               "synth.n_test": 8}),
                          {"loader": {"num_workers": workers, "pin_memory": pin,
                                      "persistent_workers": persistent}})
    settings = DataSettings(OmegaConf.to_container(cfg, resolve=True), seed=0, batch_size=4,
                            eval_batch_size=8)
    job = Job(tmp_path, DistContext(), None, False, "")
    data = build_data(settings, job)
    for loader in (data.train, data.test):
        assert loader.num_workers == workers
        assert loader.pin_memory == (pin is True)  # auto: only for a GPU device
        assert loader.persistent_workers == (persistent and workers > 0)
    assert data.train.batch_size == 4 and data.test.batch_size == 8 and data.train.drop_last
    with pytest.raises(ConfigError, match=r"^data.loader.batch_size: unknown key"):
        build_loader(Crops(), {**LOADER, "batch_size": 3}, batch_size=4, train=True)
    with pytest.raises(ConfigError, match=r"^data.loader.pin_memory: missing required key$"):
        build_loader(Crops(), {"num_workers": 0, "persistent_workers": False}, batch_size=4,
                     train=True)


def _epoch(loader, epoch):
    set_epoch(loader, epoch)
    return torch.cat([x for x, _ in loader])


def test_augmentation_follows_seed_epoch_and_sample_only():
    one = build_loader(Crops(), LOADER, batch_size=8, train=True, seed=1)
    workers = build_loader(Crops(), {**LOADER, "num_workers": 2, "persistent_workers": True},
                           batch_size=8, train=True, seed=1)
    ranks = [build_loader(Crops(), LOADER, batch_size=4, train=True, seed=1,
                          rank=r, world=2) for r in (0, 1)]
    rng = torch.get_rng_state()
    for epoch in (0, 1, 0):  # persistent workers see each epoch, and an epoch repeats exactly
        a = _epoch(one, epoch)
        assert torch.equal(a, _epoch(workers, epoch))
        r0, r1 = (_epoch(r, epoch) for r in ranks)
        assert not set(r0[:, 0].tolist()) & set(r1[:, 0].tolist())  # disjoint shards
        # global batch k = rank 0's batch k + rank 1's batch k, same samples, same crops
        both = torch.cat([r0.view(-1, 4, 3), r1.view(-1, 4, 3)], 1).view(-1, 3)
        assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, a.tolist()))
        for k in range(len(a) // 8):
            assert set(both[8 * k:8 * k + 8, 0].tolist()) == set(a[8 * k:8 * k + 8, 0].tolist())
    assert torch.equal(torch.get_rng_state(), rng)  # the data never draws from the global RNG
    e0, e1 = _epoch(one, 0), _epoch(one, 1)
    by_sample = {int(r[0]): r[1:] for r in e0}
    assert any(not torch.equal(by_sample[int(r[0])], r[1:]) for r in e1)  # new crops per epoch
    other_seed = build_loader(Crops(), LOADER, batch_size=8, train=True, seed=2)
    assert not torch.equal(_epoch(other_seed, 0), e0)


def test_worker_seeds_differ_per_rank():
    seeds = [build_loader(Crops(), {**LOADER, "num_workers": 2}, batch_size=4, train=True,
                          seed=0, rank=r, world=2).generator.initial_seed() for r in (0, 1)]
    assert seeds[0] == 0 and seeds[1] != seeds[0]


def test_epoch_sampler_and_seeded_items_directly():
    s = EpochSampler(Crops(), num_replicas=1, rank=0, shuffle=True, seed=0)
    s.set_epoch(3)
    keys = list(s)
    assert {e for e, _ in keys} == {3} and sorted(i for _, i in keys) == list(range(40))
    items = SeededItems(Crops(), seed=0)
    assert torch.equal(items[(3, 5)][0], items[(3, 5)][0])
    assert items[(3, 5)][0][0] == 5 and len(items) == 40


def test_absent_or_null_transform_ops_are_off():
    x = torch.arange(3 * 6 * 6, dtype=torch.uint8).view(3, 6, 6)
    base = {"mean": [0.0] * 3, "std": [1.0] * 3, "test": {}}
    off = {**base, "test": {"resize": None, "center_crop": None, "random_crop": None,
                            "hflip": False}, "grayscale": None}
    assert torch.equal(build_transform(off, train=False)(x), build_transform(base, train=False)(x))
    # scale = one float32 rounding (by 1/255 or /255): within 1 ulp of x / 255
    assert torch.allclose(build_transform(base, train=False)(x), x.float() / 255, rtol=2.4e-7,
                          atol=0)
