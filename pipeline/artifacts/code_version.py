"""Which project sources can change a stage's result, and their hashes (the code part of a fingerprint).

A stage's result depends on its own module and on the project modules it imports, directly or through
others; nothing else in the project can reach it. The set is computed from the import graph, read with
:mod:`ast` from the source files (never imported, so this module stays a leaf on the standard library and
:mod:`pipeline.artifacts.hashing`):

- every ``import`` statement counts, including those inside functions, because the project imports heavy
  modules lazily and a lazy import still runs when the stage does;
- importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too, so those count as well;
- ``from package import name`` counts ``package.name`` when it is a module.

A source is hashed by its code, not its bytes: the :func:`ast.dump` of its syntax tree without comments
(absent from the tree) and without docstrings and other bare string statements (they run no code), so
editing either reruns nothing. Line numbers are not in the dump, so moving code by adding comment lines
does not count either. The dump's shape is Python's, so a new Python version may change every digest once.

Computed rather than declared because a declared list goes stale silently the day someone adds an import;
the graph cannot. What the graph cannot see (a data file a module reads, a behaviour change of a
dependency) is covered by the stage's explicit ``version``. Editing ``exports/`` therefore leaves
``teacher`` and ``train`` up to date, while editing the training loop makes them stale.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

from pipeline.artifacts.hashing import sha256_bytes, sha256_file

__all__ = [
    "PROJECT_PACKAGES",
    "changed_files",
    "code_digest",
    "combined_digest",
    "import_closure",
    "project_imports",
    "project_modules",
    "project_sources",
    "source_hashes",
    "stage_code_version",
]

PROJECT_PACKAGES = ("pipeline", "stages", "exports")


def _package_folders(root: Path | None) -> list[Path]:
    """The folder of each project package: under ``root`` if given, else wherever Python finds it.

    Located, not imported: finding a package does not run it. Each package is looked up on its own, so an
    installed ``pipeline`` with ``stages`` elsewhere on the path is handled too.
    """
    if root is not None:
        return [root / package for package in PROJECT_PACKAGES if (root / package).is_dir()]
    specs = (importlib.util.find_spec(package) for package in PROJECT_PACKAGES)
    return [Path(spec.origin).parent for spec in specs if spec is not None and spec.origin]


def _module_files(root: Path | None) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the project's packages."""
    files = {}
    for folder in _package_folders(root):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder.parent).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _relative(name: str, path: Path) -> str:
    """``path`` relative to the folder holding its top-level package, e.g. ``stages/train.py``."""
    depth = name.count(".") + (1 if path.name == "__init__.py" else 0)
    return path.relative_to(path.parents[depth]).as_posix()


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its source, with their parent packages."""
    found = set()
    for target in _import_targets(name, str(path), sha256_file(path)):
        parts = target.split(".")
        found.update(p for p in (".".join(parts[: i + 1]) for i in range(len(parts))) if p in known)
    return found


@functools.lru_cache(maxsize=1024)
def _import_targets(name: str, path: str, digest: str) -> frozenset[str]:
    """Every dotted name an import statement in the file mentions (cached by content: parsing is the slow part)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(Path(path).read_bytes(), filename=path)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(targets)


def project_modules(root: Path | None = None) -> list[str]:
    """Every module of the project's packages, by dotted name."""
    return sorted(_module_files(root))


def project_imports(module: str, root: Path | None = None) -> set[str]:
    """The project modules ``module`` imports directly (anywhere in its source), with their parent packages."""
    known = _module_files(root)
    return _imports(module, known[module], known) - {module}


def import_closure(module: str, root: Path | None = None) -> dict[str, Path]:
    """``module`` and every project module it imports, transitively (name -> source file)."""
    known = _module_files(root)
    if module not in known:
        raise ValueError(f"{module!r} is not a module of the project packages {PROJECT_PACKAGES}")
    parts = module.split(".")
    todo = [".".join(parts[: i + 1]) for i in range(len(parts))]
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen or name not in known:
            continue
        seen[name] = known[name]
        todo.extend(_imports(name, known[name], known) - seen.keys())
    return dict(sorted(seen.items()))


def source_hashes(module: str, root: Path | None = None) -> dict[str, str]:
    """Project-relative path -> :func:`code_digest` of every source in ``module``'s import closure."""
    return {_relative(name, path): code_digest(path) for name, path in import_closure(module, root).items()}


def project_sources(root: Path | None = None) -> dict[str, str]:
    """Project-relative path -> :func:`code_digest` of every source of the project's packages."""
    return {_relative(name, path): code_digest(path) for name, path in _module_files(root).items()}


def code_digest(path: Path) -> str:
    """sha256 of the file's code: its syntax tree without comments and docstrings (see the module docstring)."""
    return _code_digest(str(path), sha256_file(path))


@functools.lru_cache(maxsize=1024)
def _code_digest(path: str, digest: str) -> str:
    tree = ast.parse(Path(path).read_bytes(), filename=path)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [statement for statement in body if not _is_bare_string(statement)]
    return sha256_bytes(ast.dump(tree).encode())


def _is_bare_string(statement: ast.stmt) -> bool:
    """A docstring, or a string left after an attribute as its doc: a statement that runs no code."""
    value = statement.value if isinstance(statement, ast.Expr) else None
    return isinstance(value, ast.Constant) and isinstance(value.value, str)


def stage_code_version(files: dict[str, str], version: int) -> str:
    """``v<version>-<digest>``: the stage's explicit version and one hash over its sources' hashes.

    The package version is deliberately not part of it: an upgrade that leaves a stage's sources alone
    must not retrain it.
    """
    return f"v{version}-{combined_digest(files)[:16]}"


def combined_digest(files: dict[str, str]) -> str:
    """One sha256 over a map of project-relative path -> code digest, in path order."""
    return sha256_bytes("".join(f"{path}\0{sha}\n" for path, sha in sorted(files.items())).encode())


def changed_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Sources edited, added or removed between two hash maps, each as ``path`` or ``path (added|removed)``."""
    changed = [p for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    changed += [f"{p} (added)" for p in sorted(after.keys() - before.keys())]
    changed += [f"{p} (removed)" for p in sorted(before.keys() - after.keys())]
    return changed
