"""From a data config to datasets and DataLoaders: the one entry point training code uses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DatasetError
from .hwdb import HWDB
from .imagenet import ImageNet
from .scenetext import Chars74K, ICDAR03Chars
from .svhn import SVHN
from .synthetic import ensure_synth_svhn
from .transforms import build_transform

NAMES = ("svhn", "synth_svhn", "hwdb", "icdar03", "chars74k", "imagenet")


def as_dict(cfg: Any) -> dict[str, Any]:
    """A plain, resolved dict from an omegaconf DictConfig or any mapping."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


def resolve_path(path: str | Path) -> Path:
    """A config path made absolute against the directory the user launched from.

    Under Hydra that is `hydra.utils.get_original_cwd()` (the run may have changed directory);
    otherwise the current directory.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        if HydraConfig.initialized():
            return Path(get_original_cwd()) / path
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    return Path.cwd() / path


def build_dataset(cfg: Any, split: str, transform: Callable | None | str = "config") -> Dataset:
    """The `train` or `test` dataset that data config `cfg` describes.

    `transform="config"` applies the config's transforms for that stage; pass None for raw
    (uint8 tensor, int label) items, or any callable.
    """
    c = as_dict(cfg)
    name = c.get("name")
    if name not in NAMES:
        raise DatasetError(f"unknown dataset name {name!r} in the data config; use one of {NAMES}.")
    if split not in ("train", "test"):
        raise DatasetError(f"build_dataset: split must be train or test, got {split!r}.")
    if transform == "config":
        transform = build_transform(c["transforms"], train=split == "train")
    train = split == "train"
    if name in ("svhn", "synth_svhn"):
        root = resolve_path(c["root"])
        if name == "synth_svhn":
            ensure_synth_svhn(root, **c.get("synth", {}))
        return SVHN(root, c.get(f"{split}_split", split), transform,
                    verify_md5=bool(c.get("verify_md5", name == "svhn")))
    if name == "hwdb":
        return HWDB(resolve_path(c["path"]), c.get(f"{split}_split", split), transform)
    if name == "icdar03":
        root = resolve_path(c["root"]) / c.get(f"{split}_subdir", split)
        return ICDAR03Chars(root, bool(c.get("case_sensitive", True)), transform)
    if name == "chars74k":
        return Chars74K(resolve_path(c["root"]), bool(c.get("case_sensitive", True)),
                        split, transform, float(c.get("test_fraction", 0.25)),
                        int(c.get("split_seed", 0)))
    return ImageNet(resolve_path(c["root"]), "train" if train else "val", transform)


def build_datasets(cfg: Any) -> tuple[Dataset, Dataset]:
    """(train, test) datasets for a data config (`configs/data/*.yaml`, DictConfig or dict).

    Items are `(float32 tensor (in_channels, input_size, input_size), int label)`, transformed
    and normalised as `cfg.transforms` says; both datasets have `.classes`. The number of
    classes is checked against `cfg.num_classes`, and the first training item's shape against
    `in_channels` and `input_size`, so a config that disagrees with its data fails here, with
    a message, rather than deep in the model.
    """
    c = as_dict(cfg)
    train, test = build_dataset(c, "train"), build_dataset(c, "test")
    n = len(train.classes)  # type: ignore[attr-defined]
    if "num_classes" in c and int(c["num_classes"]) != n:
        raise DatasetError(
            f"{c['name']}: data.num_classes={c['num_classes']} but the data has {n} classes; "
            f"set data.num_classes={n}."
        )
    if len(train) and "in_channels" in c and "input_size" in c:
        shape = tuple(train[0][0].shape)
        want = (int(c["in_channels"]), int(c["input_size"]), int(c["input_size"]))
        if shape != want:
            raise DatasetError(
                f"{c['name']}: transformed items have shape {shape}, but the config says "
                f"in_channels/input_size give {want}; fix data.transforms or those keys."
            )
    return train, test


def build_loader(dataset: Dataset, cfg: Any, train: bool, batch_size: int | None = None,
                 sampler: Sampler | None = None, device: str | torch.device | None = None
                 ) -> DataLoader:
    """A DataLoader with the config's `loader` settings (workers, pinning, persistence).

    `loader.pin_memory: auto` pins only when `device` (default: CUDA if available) is a GPU;
    persistent workers are used only when there are workers. Training loaders shuffle (unless
    a `sampler`, e.g. DistributedSampler, is given) and drop the last partial batch.
    """
    c = as_dict(cfg).get("loader", {})
    workers = int(c.get("num_workers", 2))
    pin = c.get("pin_memory", "auto")
    if pin == "auto":
        dev = torch.device(device) if device is not None else None
        pin = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=int(batch_size or c.get("batch_size", 128)),
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=bool(pin),
        persistent_workers=bool(c.get("persistent_workers", True)) and workers > 0,
        prefetch_factor=c.get("prefetch_factor", 2) if workers > 0 else None,
        drop_last=train and bool(c.get("drop_last", True)),
    )
