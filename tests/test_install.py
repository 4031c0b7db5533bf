"""Install anywhere: the built wheel (not the editable checkout) carries its configs and table
declarations, and ``python -m kron.train`` / ``python -m kron.tables list`` work from any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kron"


def _source_copy(dest: Path) -> Path:
    """The project's build inputs, copied so the build leaves no build/ or egg-info in the
    checkout (and no machine-local configs/local/ in the wheel)."""
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(PACKAGE, dest / "kron",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "local", "*.egg-info"))
    return dest


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(wheel, install dir, env): kron's wheel installed with --target; PYTHONPATH puts that
    copy ahead of the editable install (torch & co. still come from this environment)."""
    tmp = tmp_path_factory.mktemp("install")
    src = _source_copy(tmp_path_factory.mktemp("src"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "-w", str(tmp / "dist"), str(src)], tmp, env)
    (wheel,) = (tmp / "dist").glob("kron-*.whl")
    target = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
          "--target", str(target), str(wheel)], tmp, env)
    env["PYTHONPATH"] = str(target)
    return wheel, target, env


@pytest.mark.slow
def test_wheel_ships_every_config_and_table(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {p.relative_to(ROOT).as_posix()
            for pattern in ("configs/**/*.yaml", "experiments/*.yaml")
            for p in PACKAGE.glob(pattern) if "local" not in p.relative_to(PACKAGE).parts}
    assert want and want <= names, sorted(want - names)


@pytest.mark.slow
def test_installed_wheel_trains_and_lists_tables_from_any_folder(installed, tmp_path):
    _, target, env = installed
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = _run([sys.executable, "-c", "import kron, kron.paths as p; "
                  "print(kron.__file__); print(p.CONFIG_DIR)"], cwd, env).split()
    assert all(Path(w).is_relative_to(target) for w in where), where  # not the checkout
    out = cwd / "run"
    _run([sys.executable, "-m", "kron.train", f"hydra.run.dir={out}", f"data.root={cwd / 'data'}",
          "data.synth.n_train=64", "data.synth.n_test=32", "data.loader.num_workers=0",
          "model.width=0.125", "batch_size=32", "eval_batch_size=32", "epochs=1",
          "measure.enabled=false", "progress=false", "wandb.mode=disabled", "threads=1",
          "device=cpu"], cwd, env)
    res = json.loads((out / "results.json").read_text())
    assert res["epochs_done"] == 1 and res["world_size"] == 1
    listing = _run([sys.executable, "-m", "kron.tables", "list"], cwd, env)
    tables = sorted(p.stem for p in (target / "kron" / "experiments").glob("*.yaml"))
    assert tables and all(name in listing for name in tables), listing
