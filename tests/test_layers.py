"""Dependencies point one way: every import of the service's packages, read from the source (nothing is imported).

``api`` and ``orchestrator`` use ``store``; ``orchestrator`` calls
``workers``; nothing below ``orchestrator`` imports it; ``store`` and
``api`` do not import ``workers``; ``workers`` import neither ``store``,
``api``, ``orchestrator`` nor Prefect (a worker step is plain Python); and
``formats``, the data rules every layer shares, imports none of the others.
Imports inside functions and under ``if TYPE_CHECKING:`` count: they are
the ones that slip in.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("formats", "store", "api", "orchestrator", "workers")

FORBIDDEN = {
    "formats": {"store", "api", "orchestrator", "workers"},
    "store": {"orchestrator", "workers"},
    "api": {"orchestrator", "workers"},
    "workers": {"store", "api", "orchestrator", "prefect"},
    "orchestrator": set(),
}
"""what each package may not import (top-level names)"""


def imports(path: Path, module: str) -> Iterator[tuple[int, str]]:
    """(line, imported module) of every import in the file, wherever it is; relative imports resolved against
    ``module`` (the file's dotted name), and ``importlib.import_module`` / ``__import__`` of a literal name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
            else:
                yield node.lineno, node.module or ""
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def violations(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Every import under ``root`` that a package's row of ``FORBIDDEN`` refuses, as ``file:line: what``."""
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            for line, name in imports(path, module):
                top = name.split(".")[0]
                if top in FORBIDDEN[package]:
                    found.append(f"{rel}:{line}: {package} imports {name}")
    return found


def test_every_package_imports_only_what_sits_below_it():
    found = violations(ROOT)
    assert not found, "imports that point the wrong way:\n" + "\n".join(found)


def test_the_packages_are_all_there():
    """A package renamed or moved would otherwise pass by having no files to read."""
    assert all((ROOT / package / "__init__.py").is_file() for package in PACKAGES)
    assert len(list((ROOT / "workers").rglob("*.py"))) > 10


@pytest.mark.parametrize(
    ("package", "source", "imported"),
    [
        ("store", "from workers.common.config import coerce\n", "workers.common.config"),
        ("api", "def f():\n    from orchestrator.settings import load_defaults\n", "orchestrator.settings"),
        ("workers", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import store.models\n", "store.models"),
        ("workers", "import prefect\n", "prefect"),
        ("workers", "import importlib\nimportlib.import_module('api.app')\n", "api.app"),
        ("formats", "import store.errors as errors\n", "store.errors"),
        ("store", "from . import feedback\nfrom .errors import InvalidInput\nimport json\n", None),
    ],
)
def test_a_wrong_way_import_is_found_wherever_it_is(tmp_path, package, source, imported):
    for name in PACKAGES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / package / "sub").mkdir()
    (tmp_path / package / "sub" / "__init__.py").write_text("")
    (tmp_path / package / "sub" / "mod.py").write_text(source)
    found = violations(tmp_path)
    if imported is None:
        assert found == []
    else:
        assert len(found) == 1 and found[0].endswith(f"{package} imports {imported}")
