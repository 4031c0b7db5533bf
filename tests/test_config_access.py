"""No ``.get(key, default)`` on config nodes anywhere in kron/ (issue 20: one source of values).

The YAML files give every key a value and the schema (kron/config_schema.py) refuses a config
that lacks one, so code indexes config nodes (``cfg["lr"]``, ``cfg.lr``); a ``.get`` with a
default would be a second, silent source of values. ``"key" in node`` stays allowed, for keys
the schema marks ``NotRequired`` (may be absent, no default).

How a config node is recognised (a static approximation, per function):
- a parameter or variable whose name is ``c``, ``cfg``, ``conf``, ``config`` or ends in
  ``_cfg`` / ``_config`` / ``_conf``, or a parameter annotated ``DictConfig``;
- a variable assigned from an expression rooted at a config node (``w = cfg.wandb``,
  ``sched = cfg["scheduler"]``, ``stage = cfg[...] or {}``) or from a copy of one
  (``dict(...)``, ``as_dict(...)``, ``OmegaConf.to_container(...)``, ``deepcopy(...)``);
  names inherit into nested functions.
A call ``<node ...>.get(<string or f-string>, ...)`` on such a node is flagged, with or without
an explicit default (``.get("k")`` defaults to None). Registry and plain-dict lookups keep other
names, so they are not flagged.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import kron

PACKAGE = Path(kron.__file__).parent
CONFIG_NAME = re.compile(r"^(c|cfg|conf|config|\w+_cfg|\w+_config|\w+_conf"
                         r"|opt|sched|optimizer|scheduler|measure|wandb|loader|transforms|synth"
                         r"|layers|settings)$")
COPIES = {"dict", "as_dict", "to_container", "deepcopy", "copy"}

#: Calls flagged in files other helpers own (issue 20): kron/recipe and kron/train.py (the recipe
#: helper) and kron/tables (the compose helper) remove them; the lead empties this list when he
#: merges their branches. Entries: "path:line: code".
EXPECTED_ELSEWHERE: frozenset[str] = frozenset()


def _root(node: ast.AST) -> str | None:
    """The name an expression like ``a.b["c"].d`` or ``a.get("x", {})`` starts from."""
    while True:
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            node = node.func.value
        elif isinstance(node, ast.BoolOp):
            node = node.values[0]
        elif isinstance(node, ast.Name):
            return node.id
        else:
            return None


def _from_config(value: ast.AST, nodes: set[str]) -> bool:
    if _root(value) in nodes:
        return True
    if isinstance(value, ast.Call):
        func = value.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        return name in COPIES and any(_root(a) in nodes for a in value.args)
    return False


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
    return {a.arg for a in args
            if CONFIG_NAME.match(a.arg) or "DictConfig" in ast.unparse(a.annotation or ast.Pass())}


def _split(scope: ast.AST) -> tuple[list[ast.AST], list[ast.AST]]:
    """(the nodes of ``scope`` itself, the functions defined directly in it)."""
    own: list[ast.AST] = []
    nested: list[ast.AST] = []
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.append(node)
            continue
        own.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return own, nested


def _flag(scope: ast.AST, inherited: set[str]) -> list[ast.Call]:
    """The flagged ``.get`` calls of one scope (a module or function body), and its nested
    functions' with the names they inherit."""
    own, nested = _split(scope)
    nodes = set(inherited) | {n.id for n in own if isinstance(n, ast.Name)
                              and CONFIG_NAME.match(n.id)}
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
        nodes |= _params(scope)
    changed = True
    while changed:  # assignments in any order: until no new name is found
        changed = False
        for n in own:
            if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None \
                    and _from_config(n.value, nodes):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                new = {t.id for t in targets if isinstance(t, ast.Name)} - nodes
                changed |= bool(new)
                nodes |= new
    out = [n for n in own if isinstance(n, ast.Call) and _is_key_get(n)
           and _root(n.func.value) in nodes]
    for fn in nested:
        out += _flag(fn, nodes)
    return out


def _is_key_get(call: ast.Call) -> bool:
    """``x.get("literal", ...)`` or ``x.get(f"...", ...)``."""
    if not (isinstance(call.func, ast.Attribute) and call.func.attr == "get" and call.args):
        return False
    key = call.args[0]
    return isinstance(key, ast.JoinedStr) or (isinstance(key, ast.Constant)
                                              and isinstance(key.value, str))


def config_gets(path: Path) -> list[str]:
    """``"path:line: code"`` for each ``.get`` on a config node in one source file."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(PACKAGE).as_posix()
    return sorted({f"{rel}:{c.lineno}: {ast.unparse(c)}" for c in _flag(tree, set())})


def all_config_gets() -> list[str]:
    return [hit for p in sorted(PACKAGE.rglob("*.py")) for hit in config_gets(p)]


def _unnumbered(hit: str) -> str:
    path, _, code = hit.split(":", 2)
    return f"{path}:{code}"


def test_no_get_with_a_default_on_config_nodes():
    new = sorted(h for h in all_config_gets() if _unnumbered(h) not in EXPECTED_ELSEWHERE)
    assert not new, ("index config nodes (the YAML sets every key; the schema refuses a missing "
                     "one) instead of:\n  " + "\n  ".join(new))


def test_the_allow_list_holds_only_calls_still_there():
    gone = sorted(EXPECTED_ELSEWHERE - {_unnumbered(h) for h in all_config_gets()})
    assert not gone, f"fixed: remove from EXPECTED_ELSEWHERE: {gone}"


def test_the_scan_finds_config_gets(tmp_path):
    src = tmp_path / "sample.py"
    src.write_text(
        "def f(cfg, data_cfg, other):\n"
        "    w = cfg.wandb\n"
        "    c = dict(data_cfg)\n"
        "    stage = c['train'] or {}\n"
        "    def inner():\n"
        "        return w.get('tags', [])\n"
        "    return (cfg.get('a', 1), c.get(f'{other}_split'), stage.get('resize'),\n"
        "            other.get('x', 2), cfg['a'], REGISTRY.get('name'))\n")
    tree = ast.parse(src.read_text())
    hits = sorted(ast.unparse(c) for c in _flag(tree, set()))
    assert hits == ["c.get(f'{other}_split')", "cfg.get('a', 1)", "stage.get('resize')",
                    "w.get('tags', [])"]
