"""kron.layers is the ground floor: it imports torch, the standard library, itself and
(lazily) triton, nothing else of kron, and importing or running it changes no process-wide
state (docs/design.md, section 1)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

LAYERS = Path(__file__).resolve().parents[1] / "kron" / "layers"
# scipy: the lazy sparse SVD of large weights in kron.layers.decompose
ALLOWED_THIRD_PARTY = {"torch", "triton", "scipy"}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (anywhere in it, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_layer_files_import_only_the_ground_floor():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = {}
    for path in sorted(LAYERS.glob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if name.startswith("kron.layers") or top in stdlib | ALLOWED_THIRD_PARTY:
                continue
            bad.setdefault(path.name, []).append(name)
    assert not bad, f"kron.layers files import outside the ground floor: {bad}"


PROBE = """
import json, sys, torch
threads = torch.get_num_threads()
import kron.layers as L
x = torch.randn(2, 8, 6, 6)
with torch.no_grad():
    L.KronConv2d(8, 8, 3, [(2, 2, 1, 1)], padding=1, implementation="factored")(x)
    L.KronLinear(16, 8, [(2, 4)], implementation="factored")(torch.randn(3, 16))
print(json.dumps({"modules": sorted(m for m in sys.modules if m.split(".")[0] == "kron"),
                  "threads_same": torch.get_num_threads() == threads}))
"""


def test_importing_and_running_the_layers_loads_no_other_kron_module():
    root = LAYERS.parents[1]
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=root, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(root), "PATH": ""})
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    outside = [m for m in seen["modules"] if m != "kron" and not m.startswith("kron.layers")]
    assert outside == [], outside
    assert seen["threads_same"]
