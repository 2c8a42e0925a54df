"""The package layout is the architecture: imports point one way, down the layers."""
import ast
from pathlib import Path

from tests.conftest import ROOT

# Higher layers may import lower ones, never the reverse. Modules at bench/ itself (errors, log,
# quiet, pdl: process-wide settings) are the base every layer may use.
LAYERS = ["bench.measure", "bench.quant", "bench.models", "bench.engines", "variants", "bench.run",
          "bench.serve", "bench.analysis", "bench.cli"]
PACKAGES = ("bench", "variants")


def _module(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    """Index in LAYERS (None: a base module). `python -m bench` is the command line's entry."""
    if module == "bench.__main__":
        return LAYERS.index("bench.cli")
    found = [i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    return found[-1] if found else None


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of our packages in the file, lazy ones inside functions too."""
    out = []
    package = _module(path, root).rsplit(".", 1)[0] if path.name != "__init__.py" else _module(path, root)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # `from bench import run`
    return [(line, m) for line, m in out if m.split(".")[0] in PACKAGES]


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            mod = _module(path, root)
            mine = _layer(mod)
            worst: dict[int, tuple[int, str]] = {}  # line -> the highest layer it imports
            for line, target in _imports(path, root):
                theirs = _layer(target)
                if theirs is not None and (mine is None or theirs > mine) and theirs > worst.get(line, (-1, ""))[0]:
                    worst[line] = (theirs, target)
            for line, (theirs, target) in worst.items():
                bad.append(f"{path.relative_to(root)}:{line}: {mod} ({LAYERS[mine] if mine is not None else 'base'})"
                           f" imports {target} ({LAYERS[theirs]})")
    return sorted(bad)


def test_imports_point_down_the_layers():
    assert violations() == []


def test_every_product_module_is_in_a_layer_or_the_base():
    base = {"bench", "bench.__main__", "bench.errors", "bench.log", "bench.quiet", "bench.pdl"}
    loose = [_module(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
             if _layer(_module(p)) is None and _module(p) not in base]
    assert loose == []


def test_the_check_sees_an_upward_import(tmp_path):
    (tmp_path / "bench" / "measure").mkdir(parents=True)
    (tmp_path / "variants").mkdir()
    (tmp_path / "bench" / "measure" / "x.py").write_text("def f():\n    from bench.run.runner import Benchmark\n")
    (tmp_path / "bench" / "measure" / "y.py").write_text("from bench.measure import x\n")
    found = violations(tmp_path)
    assert len(found) == 1 and "bench/measure/x.py:2" in found[0] and "bench.run" in found[0]


def test_lab_is_not_imported_by_the_product():
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text())
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            assert not any(n.split(".")[0] in ("lab", "scripts", "tests") for n in names), path
