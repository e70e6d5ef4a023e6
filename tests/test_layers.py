"""The import graph says what the README says: each layer imports only the layers below it.

    errors <- format <- plugin API <- methods / kernels <- runtime / conversion <- hub / CLI

Every import statement counts, including imports inside functions and under TYPE_CHECKING: a lazy import is still a
dependency. The format layer never imports torch (checked statically and in a fresh interpreter).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"qformat": ROOT / "qformat", "qformat_plugins": ROOT / "plugins", "qformat_kernels": ROOT / "kernels",
            "qformat_conformance": ROOT / "conformance"}

# Longest prefix wins. Equal layers may import each other unless a rule below says otherwise.
LAYERS = {
    "qformat.errors": 0, "qformat.version": 0, "qformat.units": 0,
    "qformat.format": 1,
    # the plugin API: the contracts plugins implement, and their discovery
    "qformat.methods": 2, "qformat.importers": 2, "qformat.exporters": 2, "qformat.kernel_api": 2, "qformat.hookspecs": 2, "qformat.plugins": 2,
    "qformat.plugin": 2, "qformat.lowering": 2, "qformat.transforms": 2, "qformat.block_layout": 2,
    "qformat.sidecar": 2,
    # methods and kernels (plugins), the harness plugin authors run, the conformance runner
    "qformat_plugins": 3, "qformat_kernels": 3, "qformat.testing": 3, "qformat_conformance": 3,
    # running and converting models
    "qformat.text": 4, "qformat.model_card": 4, "qformat.runtime": 4, "qformat.conversion": 4,
    # the top: Hub, command line, the Python entry points
    "qformat.hub": 5, "qformat.cli": 5, "qformat.api": 5, "qformat": 5,
}
LAYER_NAMES = ["errors", "format", "plugin API", "methods/kernels", "runtime/conversion", "hub/CLI"]
# Within a layer: plugins are independent of each other, and the runtime does not reach into the converter.
FORBIDDEN_SAME_LAYER = [("qformat_plugins", "qformat_kernels"), ("qformat_kernels", "qformat_plugins"),
                        ("qformat.runtime", "qformat.conversion")]
HEAVY = ("torch", "transformers", "triton", "numba", "accelerate", "huggingface_hub")


def module_files() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


MODULES = module_files()


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement; relative imports resolved, ``from X import y`` counted as
    X.y where that is a module of ours."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.append((candidate if candidate in MODULES else target, node.lineno))
    return found


def layer_of(module: str) -> tuple[int, str] | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
            best = (layer, prefix)
    return best


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


def test_no_module_imports_a_layer_above_it():
    violations = []
    for module, path in MODULES.items():
        own, own_prefix = layer_of(module)
        for target, line in imports_of(module, path):
            placed = layer_of(target)
            if placed is None:
                continue  # a third-party or standard-library module
            layer, prefix = placed
            if layer > own:
                violations.append(f"{path.relative_to(ROOT)}:{line}: {module} ({LAYER_NAMES[own]}) imports {target} "
                                  f"({LAYER_NAMES[layer]})")
            elif layer == own and (own_prefix, prefix) in FORBIDDEN_SAME_LAYER:
                violations.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {target}")
    assert violations == []


def test_no_import_cycles_between_modules():
    graph = {m: {t for t, _ in imports_of(m, p) if t in MODULES and t != m} for m, p in MODULES.items()}
    # A package's __init__ re-exporting its submodules is not a cycle with them.
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_format_layer_never_imports_heavy_libraries():
    bad = [f"{path.relative_to(ROOT)}:{line}: {target}" for module, path in MODULES.items()
           if layer_of(module)[0] <= 1 for target, line in imports_of(module, path)
           if target.split(".")[0] in HEAVY]
    assert bad == []


@pytest.mark.parametrize("module", ["qformat.format", "qformat.plugin"])
def test_importing_the_lower_layers_loads_no_torch(module):
    code = (f"import sys, {module}\nheavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself can fail: a format module importing the runtime is reported."""
    path = tmp_path / "record.py"
    path.write_text("from ..runtime import loader\n")
    imported = imports_of("qformat.format.record", path)
    assert ("qformat.runtime.loader", 1) in imported
    assert layer_of("qformat.runtime.loader")[0] > layer_of("qformat.format.record")[0]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_source_folders_never_hide_an_installed_package(package):
    """The repository root is on sys.path whenever Python runs from it (`python -m pytest`, `python -c`, notebooks).
    A source folder installed under another import name must not be a regular package there: `kernels/` with an
    `__init__.py` hid Hugging Face's `kernels`, which transformers >= 5.25 imports on every model load, and every load
    from the repository root failed (CI, transformers 5.25.0). Without `__init__.py` the folder is a namespace portion,
    and an installed regular package of the same name wins over it."""
    folder = PACKAGES[package]
    if folder.name == package:
        return
    assert not (folder / "__init__.py").exists(), f"{folder.name}/__init__.py would shadow a top-level '{folder.name}'"
    probe = (f"import importlib.util, sys; spec = importlib.util.find_spec({folder.name!r}); "
             f"print(spec.origin if spec and spec.origin else '')")
    origin = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    origin = origin.stdout.strip()
    assert not origin or not Path(origin).resolve().is_relative_to(ROOT / folder.name), origin


def test_transformers_model_classes_import_from_the_repository_root():
    """The failure the rule above prevents, end to end: transformers imports its Hub-kernels integration (and with it
    any installed `kernels` distribution) when a model class is first used."""
    probe = "import transformers; transformers.BertModel; transformers.LlamaForCausalLM; print('ok')"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
