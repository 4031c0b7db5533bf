"""Where kron's packaged resources live: the Hydra config tree and the paper-table declarations.

Both ship inside the package (``kron/configs``, ``kron/experiments``), so an installed wheel finds
them from any working folder; see docs/design.md, D7.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
EXPERIMENTS_DIR = PACKAGE_DIR / "experiments"
