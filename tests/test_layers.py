"""The import contract: fedsim's layers only point down.

Every ``import`` statement in ``fedsim/`` (at module level *and* inside functions) is read from
the source with :mod:`ast`; a module may import only from its own layer or a lower one. The
layers, lowest first, are drawn in ``docs/architecture.md``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "fedsim"

#: Lowest first. A module belongs to the first entry that is a prefix of its dotted name.
LAYERS: list[tuple[str, ...]] = [
    ("fedsim._logging", "fedsim.registry"),
    ("fedsim.rundir", "fedsim.callbacks", "fedsim.faults", "fedsim.config", "fedsim.provenance", "fedsim.configfile"),
    ("fedsim.data", "fedsim.models", "fedsim.metrics"),
    ("fedsim.cme", "fedsim.strategies", "fedsim.tracking"),
    ("fedsim.clients",),
    ("fedsim.server", "fedsim.simulation"),
    ("fedsim.analysis",),
    ("fedsim.study",),
    ("fedsim.cli", "fedsim.__main__"),
]

#: Modules every layer may use (the package root only re-exports the logger).
SHARED = {"fedsim"}

#: Modules that must import without torch (the CLI's --help, reading configs and CME archives).
TORCH_FREE = [
    "fedsim.cli",
    "fedsim.config",
    "fedsim.rundir",
    "fedsim.callbacks",
    "fedsim.registry",
    "fedsim.cme",
    "fedsim.cme.archive",
    "fedsim.provenance",
    "fedsim.configfile",
    "fedsim.tracking",
    "fedsim.analysis.runs",
    "fedsim.metrics.landmarks",
    "fedsim.metrics.classification",
]


def layer_of(module: str) -> int:
    if module == "fedsim":  # the package root: re-exports the logger only
        return 0
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"module {module} belongs to no layer; add it to LAYERS and docs/architecture.md")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def fedsim_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every ``fedsim`` import in the file, wherever it stands."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "fedsim"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] == "fedsim":
                # `from fedsim.x import y` may import the submodule fedsim.x.y
                names = [f"{target}.{a.name}" for a in node.names]
                out += [(node.lineno, n if _is_module(n) else target) for n in names]
    return out


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in all_modules():
        layer_of(module_name(path))


def test_imports_only_point_down():
    violations = []
    for path in all_modules():
        mod = module_name(path)
        here = layer_of(mod)
        for line, target in fedsim_imports(path):
            if target in SHARED:
                continue
            if layer_of(target) > here:
                violations.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {mod} (layer {here}) imports {target} (layer {layer_of(target)})"
                )
    assert not violations, "imports that point upward:\n" + "\n".join(violations)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The contract test itself: an upward import inside a function is caught."""
    fake = PACKAGE / "config.py"
    src = "def f():\n    from fedsim.clients.tasks import get_task\n    from . import rundir\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: src if self == fake else Path.read_bytes(self).decode())
    found = fedsim_imports(fake)
    assert (2, "fedsim.clients.tasks") in found and (3, "fedsim.rundir") in found
    assert layer_of("fedsim.clients.tasks") > layer_of("fedsim.config")


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"importing {module} pulls in {proc.stdout.strip()} {proc.stderr[-2000:]}"


def test_cli_help_imports_no_torch():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fedsim.cli", "--help"], check=False, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "usage: fedsim" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "flwr" not in imported
