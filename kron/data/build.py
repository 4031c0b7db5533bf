"""From a data config to datasets and DataLoaders: the one builder training and tests use."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .errors import DatasetError
from .transforms import build_transform


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

    The config is checked first (:func:`kron.config_schema.check_data_config`: its dataset's
    keys, all present), then built by the dataset registered under its `name`
    (:mod:`kron.data.registry`). `transform="config"` applies the config's transforms for that
    stage; pass None for raw (uint8 tensor, int label) items, or any callable.
    """
    from kron.config_schema import check_data_config

    from .registry import dataset_entry

    c = as_dict(cfg)
    if split not in ("train", "test"):
        raise DatasetError(f"build_dataset: split must be train or test, got {split!r}.")
    check_data_config(c)
    if transform == "config":
        transform = build_transform(c["transforms"], train=split == "train")
    return dataset_entry(c).build(c, split, transform)


def build_datasets(cfg: Any) -> tuple[Dataset, Dataset]:
    """(train, test) datasets for a data config (`configs/data/*.yaml`, DictConfig or dict).

    Items are `(float32 tensor (in_channels, input_size, input_size), int label)`, transformed
    and normalised as `cfg.transforms` says; both datasets have `.classes`. The number of
    classes is checked against `cfg.num_classes`, and the first training item's shape against
    `in_channels` and `input_size`, so a config that disagrees with its data fails here, with
    a message, rather than deep in the model.
    The global torch RNG is left as it was (the probe's random transforms draw on a fork).
    """
    c = as_dict(cfg)
    train, test = build_dataset(c, "train"), build_dataset(c, "test")
    n = len(train.classes)  # type: ignore[attr-defined]
    if int(c["num_classes"]) != n:
        raise DatasetError(
            f"{c['name']}: data.num_classes={c['num_classes']} but the data has {n} classes; "
            f"set data.num_classes={n}."
        )
    if len(train):
        # the probe runs the training transforms (random crops): on a forked CPU stream, so
        # building the data never moves the global RNG (model init and dropout draw from it)
        with torch.random.fork_rng(devices=[]):
            shape = tuple(train[0][0].shape)
        want = (int(c["in_channels"]), int(c["input_size"]), int(c["input_size"]))
        if shape != want:
            raise DatasetError(
                f"{c['name']}: transformed items have shape {shape}, but the config says "
                f"in_channels/input_size give {want}; fix data.transforms or those keys."
            )
    return train, test


class EpochSampler(DistributedSampler):
    """This rank's shard of one seeded permutation per epoch, each index paired with its epoch.

    The permutation depends on ``(seed, epoch)`` only, and rank ``r`` of ``world`` takes every
    ``world``-th index from ``r``, so the ranks' shards are disjoint and together form the
    single-process order (a global batch holds the same samples at any world size). The epoch
    travels with each index to :class:`SeededItems`, also into persistent workers.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


class SeededItems(Dataset):
    """``dataset[i]`` with its random transforms drawn from a generator seeded by
    ``(seed, epoch, i)``.

    Why: a sample's augmentation is then the same whichever rank or worker loads it, however
    many workers there are and whether they persist, and after a resume; and no two samples of
    a run (so no two ranks) draw from one stream. The global torch RNG is restored after each
    item, so model code (dropout) never sees the data's draws.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, i = key
        item_seed = np.random.SeedSequence([self.seed, epoch, i]).generate_state(1, np.uint64)[0]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also queue a CUDA seeding call
            # that captures a stack trace (about 1.7 ms per item, a quarter of a CPU epoch)
            torch.default_generator.manual_seed(int(item_seed))
            return self.dataset[i]


def build_loader(dataset: Dataset, loader_cfg: Mapping[str, Any], *, batch_size: int,
                 train: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 device: str | torch.device = "cpu") -> DataLoader:
    """The DataLoader training (and every test) uses, with every option of ``loader_cfg``.

    ``loader_cfg`` is a data config's ``loader`` mapping, every key present
    (:class:`kron.config_schema.LoaderConfig`): ``num_workers``, ``pin_memory`` (``auto``: pin
    when ``device`` is a GPU) and ``persistent_workers`` (in effect only with workers, as torch
    requires). ``batch_size`` is per process. Training (``train=True``): this
    rank's shard of a seeded permutation per epoch (:class:`EpochSampler`; call
    :func:`set_epoch` before each epoch), per-sample seeded augmentation (:class:`SeededItems`),
    the last partial batch dropped (every rank takes the same number of steps). Evaluation:
    items ``rank, rank + world, ...`` in order, nothing dropped. Worker processes get a base
    seed distinct per rank (``kron.distributed.seed_for_rank``). See docs/design.md, D6
    and D8.
    """
    from kron.config_schema import LoaderConfig, check_against
    from kron.distributed import seed_for_rank

    c = as_dict(loader_cfg)
    check_against(c, LoaderConfig, "data.loader")
    workers = int(c["num_workers"])
    pin = c["pin_memory"]
    pin = torch.device(device).type == "cuda" if pin == "auto" else bool(pin)
    generator = torch.Generator().manual_seed(seed_for_rank(seed, rank))
    sampler: Sampler | None = None
    if train:
        sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        dataset = SeededItems(dataset, seed)
    else:
        dataset = Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler,
                      num_workers=workers, pin_memory=pin,
                      persistent_workers=bool(c["persistent_workers"]) and workers > 0,
                      drop_last=train, generator=generator)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Start ``epoch`` on a training loader from :func:`build_loader` (its order and seeds)."""
    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
