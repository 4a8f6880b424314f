"""One direction of calls: cli -> demo -> the library (train, data, export, eval, ...) -> models, diffusion.

Every import is read from the source (function-local ones too), so a lazy import cannot hide a
call that goes the wrong way.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("pixart.models", "pixart.diffusion")


def imports(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved against its package."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)  # `from pixart import cli`
    return found


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def offenders(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in paths:
        hits = sorted(n for n in imports(path) if any(under(n, f) for f in forbidden))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def test_the_import_reader_sees_lazy_and_relative_imports():
    pkg = ROOT / "pixart" / "train"
    got = imports(pkg / "recipe.py")
    assert "pixart.export.dit" in got  # imported inside launch()
    assert "pixart.train.config" in got  # `from .config import ...`
    assert "pixart.cli" in imports(ROOT / "pixart" / "cli" / "data.py")  # `from pixart.cli import data_sam, ...`


def test_nothing_outside_the_cli_imports_it():
    # The entry points above the CLI may: pixart/__main__.py (`python -m pixart`) and tools/ (its argument types).
    paths = [p for p in sources("pixart", "data_pipelines")
             if not under(".".join(p.relative_to(ROOT).parts), "pixart.cli") and p.name != "__main__.py"]
    assert paths and offenders(paths, ("pixart.cli",)) == {}


def test_the_library_does_not_import_the_demo():
    paths = [p for p in sources("pixart", "data_pipelines")
             if p.relative_to(ROOT).parts[1] not in ("cli", "demo", "__main__.py")]
    assert offenders(paths, ("pixart.demo",)) == {}


@pytest.mark.parametrize("core", CORE)
def test_models_and_diffusion_import_only_each_other(core):
    library = ("pixart.train", "pixart.data", "pixart.export", "pixart.eval", "pixart.encoders", "pixart.demo",
               "pixart.cli", "pixart.checkpoint", "pixart.atomic", "data_pipelines")
    assert offenders(sources(core.replace(".", "/")), library) == {}
