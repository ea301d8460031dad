"""Kvant's layering, checked from the source (function-local imports included).

    python tools/check_architecture.py        # exit 1 and one line per violation

Why not import-linter alone: Kvant maps quantize/, export/ and bench/ at the repository
root into the `kvant` package (setuptools package-dir), and import-linter's graph builder
(grimp) finds subpackages by walking the package's own folder, so it would not see them.
This script walks the same mapping from pyproject.toml and parses every module with `ast`.

A module's layer is its folder's (LAYERS, lowest first); a folder with no layer fails.
Rules:
1. Layers: a module imports only modules of its own layer or lower ones; quantize/ and
   export/ (both pipelines) do not import each other.
2. No import cycles between Kvant modules.
3. No private names across modules (`from kvant.x import _y`).
4. A function-local import of a Kvant module only in the app and study layers, or of a
   module that is heavy (imports an engine such as torch or llama_cpp at its top, directly
   or through other Kvant modules): anything else buys nothing and hides the dependency.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each layer's folders, relative to the repository root, lowest layer first.
LAYERS = {
    "core": ("kvant", "kvant/plan", "kvant/runtimes"),  # artifacts, data, models, runtimes
    "pipeline": ("quantize", "export"),  # each makes one kind of artifact
    "bench": ("bench",),  # the bench library: scenario, worker, report, peers, depth
    "app": ("kvant/app",),  # what a user runs: cli, generate, serve, release
    "study": ("bench/studies",),  # one-off measurements behind docs/ tables
}
ORDER = {name: i for i, name in enumerate(LAYERS)}
TOP = ("app", "study")  # the layers that may import lazily
# Engines and other imports that cost a second or more, or pull in a GPU stack.
HEAVY = {"torch", "transformers", "gptqmodel", "llama_cpp", "onnxruntime",
         "onnxruntime_genai", "bitsandbytes", "accelerate", "optimum", "matplotlib",
         "huggingface_hub", "gguf", "tokenizers", "safetensors", "numpy", "tqdm", "mlx",
         "mlx_lm"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (or module.name; resolved against known modules)
    names: tuple[str, ...]
    line: int
    local: bool  # inside a function


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every Kvant module name -> file, following pyproject's packages and package-dir mapping
    (as setuptools does: a package's folder is its longest mapped prefix's, then its name)."""
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = config.get("package-dir", {})

    def folder_of(pkg: str) -> Path:
        parts = pkg.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in mapped:
                return root / mapped[".".join(parts[:n])] / "/".join(parts[n:])
        return root / pkg.replace(".", "/")

    out = {}
    for pkg in config["packages"]:
        for file in sorted(folder_of(pkg).glob("*.py")):
            out[pkg if file.stem == "__init__" else f"{pkg}.{file.stem}"] = file
    return out


def imports(name: str, file: Path) -> list[Import]:
    tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
    found = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(name, alias.name, (), child.lineno, local))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append(Import(name, child.module, tuple(a.name for a in child.names),
                                    child.lineno, local))
            visit(child, inner)

    visit(tree, False)
    return found


def layer(module: str, known: dict[str, Path] | None = None, root: Path = ROOT) -> str:
    """The layer of ``module``: its folder's, from LAYERS."""
    file = (known or modules(root))[module]
    folder = file.parent.relative_to(root).as_posix()
    for name, folders in LAYERS.items():
        if folder in folders:
            return name
    raise LookupError(f"{folder}/ has no layer: add it to LAYERS in tools/check_architecture.py")


def _resolve(imp: Import, known: dict[str, Path]) -> list[str]:
    """The Kvant modules an import statement loads (from kvant.x import y may name a module)."""
    if imp.target != "kvant" and not imp.target.startswith("kvant."):
        return []
    subs = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in known]
    # `from kvant.bench import peers` asks for the submodule; the package comes with it
    return subs or ([imp.target] if imp.target in known else [])


def check(root: Path = ROOT) -> list[str]:
    known = modules(root)
    graph: dict[str, list[tuple[str, Import]]] = {}
    problems = []
    top_heavy: dict[str, bool] = {}
    for name, file in known.items():
        found = imports(name, file)
        graph[name] = [(t, imp) for imp in found for t in _resolve(imp, known) if t != name]
        top_heavy[name] = any(i.target.split(".")[0] in HEAVY for i in found if not i.local)

    def heavy(module: str, seen=()) -> bool:
        if top_heavy[module]:
            return True
        return any(heavy(t, (*seen, module)) for t, imp in graph[module]
                   if not imp.local and t not in seen and t != module)

    layers = {}
    for name in known:
        try:
            layers[name] = layer(name, known, root)
        except LookupError as exc:
            problems.append(f"{known[name].relative_to(root)}: {exc}")
    for name, edges in graph.items():
        where = f"{known[name].relative_to(root)}"
        for target, imp in edges:
            if target == "kvant" or name not in layers or target not in layers:
                continue
            a, b = layers[name], layers[target]
            if ORDER[b] > ORDER[a]:
                problems.append(f"{where}:{imp.line}: {a} module {name} imports {b} module "
                                f"{target}")
            if a == b == "pipeline" and known[target].parent != known[name].parent:
                problems.append(f"{where}:{imp.line}: {name} imports {target} "
                                "(quantize and export are independent)")
            private = [n for n in imp.names if n.startswith("_")]
            if private:
                problems.append(f"{where}:{imp.line}: private name {', '.join(private)} "
                                f"imported from {imp.target}")
            if imp.local and a not in TOP and not heavy(target):
                problems.append(f"{where}:{imp.line}: function-local import of {target}, "
                                "which is light: import it at the top")
    problems += _cycles(graph, known, root)
    return problems


def _cycles(graph, known, root) -> list[str]:
    """One line per import cycle (Tarjan's strongly connected components)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in graph[v]:
            if w == "kvant":
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append("import cycle: " + " <-> ".join(sorted(part)))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return out


def main() -> int:
    problems = check()
    for line in problems:
        sys.stdout.write(line + "\n")
    if problems:
        sys.stdout.write(f"{len(problems)} architecture violation(s); see "
                         "tools/check_architecture.py for the rules\n")
        return 1
    sys.stdout.write(f"architecture: {len(modules())} modules, layers respected, no cycles\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
