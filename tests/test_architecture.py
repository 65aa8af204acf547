"""The layering of the four packages, as a rule: every import of every module is checked.

``pipeline -> bank -> train`` is the direction data flows; ``flows`` orchestrates
them. So: ``pipeline`` imports nothing of ours; ``bank`` imports neither
``pipeline``, ``train`` nor ``flows`` (it stores what it is given); ``train``
imports ``bank`` only; ``flows`` may import all of them; nobody imports ``bench``.
Outside ``bank/`` the bank is used through its public modules only, since
``bank/`` is the only code that knows the on-disk layout. Imports inside
functions count as much as those at the top of a module. Every import of ours goes
through the installed ``maskbank.`` namespace, never the bare folder names (which
would load a second copy of a module and collide with other packages of those names).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "bank", "train", "flows")
OURS = (*PACKAGES, "bench")

#: What the rest of the code may import of the bank (docs/architecture.md, "bank").
PUBLIC_BANK_MODULES = frozenset(
    {"bank", "bank.errors", "bank.browse", "bank.writing", "bank.sampling", "bank.storage_options"}
)

#: Of ours, what each package may import besides itself.
MAY_IMPORT = {
    "pipeline": frozenset(),
    "bank": frozenset(),
    "train": frozenset({"bank"}),
    "flows": frozenset({"pipeline", "bank", "train"}),
}

#: Third-party packages a package must not import (what ties it to storage or orchestration).
MUST_NOT_IMPORT = {
    "pipeline": frozenset({"zarr", "prefect", "dask", "distributed"}),
    "bank": frozenset({"prefect", "dask", "distributed"}),
    "train": frozenset({"prefect", "dask", "distributed"}),
    "flows": frozenset(),
}

#: Parts of a forbidden package that a package may still use: ``dask.array`` is a data
#: structure (``scan.image.to_dask()``, imported on request), not orchestration.
ALLOWED_PARTS = {"bank": ("dask.array",)}

#: Known breaches, each with why it is still there; the test fails once one is gone, so the
#: list only shrinks. (module path, imported top-level package)
KNOWN_BREACHES: set[tuple[str, str]] = set()


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = _module_name(path)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base[: len(base) - node.level + is_package]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from bank import proposals" imports the module bank.proposals
            found += [(node.lineno, module)]
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


NAMESPACE = "maskbank."


def _bare_imports(path: Path) -> list[str]:
    """Absolute imports of our packages that skip the ``maskbank.`` namespace."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and not n.level and n.module
    ]
    return [name for name in names if name.split(".")[0] in OURS]


def _is_module(name: str) -> bool:
    parts = name.split(".")
    base = ROOT.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def breaches(package: str) -> list[tuple[str, str]]:
    """(where, what) of every import of ``package``'s modules that breaks the rules."""
    found = []
    for path in _modules(package):
        rel = path.relative_to(ROOT).as_posix()
        for line, module in _imports(path):
            module = module.removeprefix(NAMESPACE)
            top = module.split(".")[0]
            where = f"{rel}:{line}"
            if top in OURS and top != package:
                if top not in MAY_IMPORT[package]:
                    found.append((where, f"imports {module} ({package} may not import {top})"))
                elif top == "bank" and _is_module(module) and module not in PUBLIC_BANK_MODULES:
                    found.append(
                        (
                            where,
                            f"imports {module}, not a public bank module "
                            f"({sorted(PUBLIC_BANK_MODULES)})",
                        )
                    )
            elif top in MUST_NOT_IMPORT[package] and not any(
                module == part or module.startswith(part + ".")
                for part in ALLOWED_PARTS.get(package, ())
            ):
                found.append((where, f"imports {module} ({package} may not import {top})"))
    return found


def _known(where: str, what: str) -> bool:
    path = where.split(":")[0]
    return any(path == p and f"may not import {top})" in what for p, top in KNOWN_BREACHES)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_follow_the_layering(package):
    found = [f"{w}: {what}" for w, what in breaches(package) if not _known(w, what)]
    assert not found, "layering broken:\n" + "\n".join(found)


def test_known_breaches_are_still_there():
    """A breach that was fixed must leave KNOWN_BREACHES, so that it cannot come back."""
    everything = [b for p in PACKAGES for b in breaches(p)]
    for path, top in sorted(KNOWN_BREACHES):
        assert any(
            w.split(":")[0] == path and f"may not import {top})" in what for w, what in everything
        ), f"{path} no longer imports {top}: remove it from KNOWN_BREACHES"


#: Names of the bank's on-disk layout (bank/layout.py, bank/proposal_store.py) that only bank/ spells.
LAYOUT_NAMES = ("proposals/layers", "members_indptr", "members_start", "members_stop", "table/")


def _strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the string constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "bank"])
def test_only_the_bank_spells_its_layout(package):
    found = [
        f"{path.relative_to(ROOT).as_posix()}:{line}: {text!r}"
        for path in _modules(package)
        for line, text in _strings(path)
        if any(name in text for name in LAYOUT_NAMES)
    ]
    assert not found, "bank layout spelled outside bank/:\n" + "\n".join(found)


def test_public_bank_modules_exist():
    for module in PUBLIC_BANK_MODULES:
        assert _is_module(module), module


def test_the_walker_sees_nested_relative_and_from_imports():
    """What the rule relies on: imports inside functions, relative and 'from x import y'."""
    source = (ROOT / "bank" / "proposal_store.py").read_text(encoding="utf-8")
    assert "def " in source
    names = {m for _, m in _imports(ROOT / "bank" / "proposal_store.py")}
    assert "bank.errors" in names  # from .errors import ...
    assert "bank.layout.PROPOSALS_PART" in names
    nested = {m for _, m in _imports(ROOT / "bank" / "bank.py")}
    assert "bank.verify" in nested  # imported inside Bank.verify()


def test_every_import_of_ours_goes_through_the_namespace():
    files = [p for d in (*PACKAGES, "tests", "bench") for p in sorted((ROOT / d).rglob("*.py"))]
    found = [f"{p.relative_to(ROOT)}: {name}" for p in files for name in _bare_imports(p)]
    assert not found, "import these as maskbank.<package>:\n" + "\n".join(found)


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages by hand (the folders map into ``maskbank.``)."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        NAMESPACE + ".".join(init.parent.relative_to(ROOT).parts)
        for package in PACKAGES
        for init in (ROOT / package).rglob("__init__.py")
    }
    assert folders <= listed, f"add to pyproject.toml: {sorted(folders - listed)}"
    assert all((ROOT / Path(*name.split(".")[1:])).is_dir() for name in listed)


#: Besides flows/cli.py, modules that may import ``flows.commands`` (the CLI), with why;
#: the list only shrinks.
COMMANDS_IMPORTERS = {
    # maskbank-serve is a command line of its own and applies the CLI's Prefect defaults
    "flows/serve.py": "flows.commands._prefect_env",
}


def test_only_the_cli_imports_the_commands():
    """``flows.commands`` only parses arguments: library code never imports it back."""
    found = []
    for package in OURS:
        for path in _modules(package):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "flows/cli.py" or rel.startswith("flows/commands/"):
                continue
            allowed = COMMANDS_IMPORTERS.get(rel, "\0")
            for line, module in _imports(path):
                module = module.removeprefix(NAMESPACE)
                is_cli = module == "flows.commands" or module.startswith("flows.commands.")
                if is_cli and not module.startswith(allowed):
                    found.append(f"{rel}:{line}: imports {module}")
    assert not found, "only flows/cli.py imports flows.commands:\n" + "\n".join(found)


#: A module is one concept; past this many lines it usually holds two.
MAX_MODULE_LINES = 550


def test_modules_stay_small():
    """Library modules stay under the size at which they start to carry two concepts."""
    big = [
        f"{path.relative_to(ROOT).as_posix()}: {n} lines"
        for package in PACKAGES
        for path in _modules(package)
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, f"split by concept (<= {MAX_MODULE_LINES} lines):\n" + "\n".join(big)
