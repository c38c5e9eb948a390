"""The architecture is checked, not hoped for (DESIGN.md §2).

- import-linter's contracts in ``pyproject.toml``: ``events`` <- ``projections`` <-
  (``actors`` | ``infra.adapters``) <- ``infra.shell``, and no import circles anywhere;
- no ``_private`` name is imported from another module: a module that needs another's
  private names is one concept cut in two (STYLE.md, "What this means here" 9).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("events", "projections", "actors", "infra")


def _modules(*tops: str) -> dict[str, Path]:
    found = {}
    for top in tops:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports(modules: dict[str, Path], known: set[str], root: Path = ROOT) -> list[str]:
    """``from x import _y`` / ``x._y`` where ``x`` is another project module."""
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}  # local name -> project module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, path, node)
                if source.split(".")[0] not in known:
                    continue
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                    elif alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(root)}:{node.lineno} imports {alias.name} from {source}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in known and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(root)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def test_import_contracts_hold() -> None:
    # In a child process: import-linter reconfigures logging (disabling existing loggers),
    # which must not leak into the other tests of this session.
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
         "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_private_name_crosses_a_module() -> None:
    found = private_imports(_modules(*PACKAGES, "tests"), set(PACKAGES) | {"tests"})
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def test_the_checker_sees_a_private_import(tmp_path: Path) -> None:
    """The check above is not vacuous: it flags both forms it looks for."""
    a = tmp_path / "pkg_a.py"
    a.write_text("from pkg_b import _hidden, visible\nimport pkg_b as b\nb._other()\n")
    (tmp_path / "pkg_b.py").write_text("_hidden = visible = 1\ndef _other(): ...\n")
    mods = {"pkg_a": a, "pkg_b": tmp_path / "pkg_b.py"}
    found = private_imports(mods, {"pkg_a", "pkg_b"}, root=tmp_path)
    assert found == ["pkg_a.py:1 imports _hidden from pkg_b", "pkg_a.py:3 uses pkg_b._other"]
