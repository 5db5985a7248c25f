"""The project files a module executes: its imports followed transitively, read from the source (nothing is
imported). DVC stage deps are checked against this (tests/test_stage_deps.py) and a grid run's key hashes
exactly these files (tasks/grid/runs.py), so neither is a list kept in step by hand.

Every `import` counts, at module level or inside a function (a lazy import runs when the code path does),
except those under `if TYPE_CHECKING:`, which never run. Importing `a.b.c` runs `a/__init__.py` and
`a/b/__init__.py` too, so those are included.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterator
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "rain_model")  # the project's own code; everything else is an installed library


def module_file(module: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The file of project module `module` (`a.b` -> a/b.py or a/b/__init__.py), None if it is not one."""
    if module.partition(".")[0] not in PACKAGES:
        return None
    base = root / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _imported(path: Path, module: str) -> set[str]:
    """Absolute names of the modules `path` (module `module`) may import: `a.b` for `import a.b`, and for
    `from a import b` both `a` and `a.b` (b may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..a import b
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def module_files(module: str, root: Path = PROJECT_ROOT) -> list[Path]:
    """The project files running `python -m module` may execute, sorted, relative to `root`."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages above run first
            prefix = ".".join(parts[:i])
            path = module_file(prefix, root)
            if path is not None and prefix not in seen:
                seen[prefix] = path
                todo.extend(_imported(path, prefix))
    return sorted(path.relative_to(root) for path in seen.values())


def code_hash(module: str, root: Path = PROJECT_ROOT) -> str:
    """sha256 of the files running `python -m module` executes (their paths and contents)."""
    digest = hashlib.sha256()
    for file in module_files(module, root):
        digest.update(file.as_posix().encode())
        digest.update((root / file).read_bytes())
    return digest.hexdigest()


def as_deps(files: list[Path], root: Path = PROJECT_ROOT) -> list[str]:
    """`files` as DVC deps: a folder where the stage executes every .py file under it, else the file."""
    wanted = {f.as_posix() for f in files}
    whole = {d for d in {Path(f).parent.as_posix() for f in wanted}
             if wanted >= {p.relative_to(root).as_posix() for p in (root / d).rglob("*.py")}}
    top = {d for d in whole if not any(d.startswith(o + "/") for o in whole)}
    rest = {f for f in wanted if not any(f.startswith(d + "/") for d in top)}
    return sorted(top) + sorted(rest)


def main() -> None:
    """`python -m tasks.infra.imports tasks.train`: the code deps of the stage running that module."""
    import sys

    for module in sys.argv[1:]:
        print(f"{module}:")
        print("\n".join(f"  - {dep}" for dep in as_deps(module_files(module))))


if __name__ == "__main__":
    main()
