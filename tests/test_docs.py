"""docs/architecture.md names only what exists: every `ddpm_jax/...` path and every backticked
`module.name` (or `Class.member`) it mentions is in the code.

Read with `ast` from the source (no import, no JAX), so the check is instant and a renamed or
removed function fails here instead of leaving the architecture guide quietly wrong.
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ddpm_jax"
DOC = ROOT / "docs" / "architecture.md"

_SPAN = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(r"ddpm_jax/[\w/.<>-]+")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


def _module_file(parts: list[str]) -> pathlib.Path | None:
    """The source file of the package module `parts` (relative to ddpm_jax), if there is one."""
    base = PACKAGE.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _top_level(tree: ast.Module) -> dict[str, ast.AST]:
    """Names a module defines or imports at its top level, with their defining node."""
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        names[leaf.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
    return names


def _members(cls: ast.ClassDef) -> set[str]:
    """Methods, fields and class attributes of a class body."""
    out = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
        elif isinstance(node, ast.Assign):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return out


def _classes() -> dict[str, list[ast.ClassDef]]:
    found: dict[str, list[ast.ClassDef]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append(node)
    return found


def _spans() -> list[str]:
    return _SPAN.findall(DOC.read_text())


def _problem(name: str, classes: dict) -> str | None:
    """Why the dotted `name` does not resolve in the package; None when it does, or names no module."""
    parts = name.split(".")
    if _module_file(parts) is not None:  # a module itself
        return None
    if parts[0] in classes:  # Class.member
        if not any(parts[1] in _members(c) for c in classes[parts[0]]):
            return f"{name}: class {parts[0]} has no member {parts[1]}"
        return None
    for split in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module
        path = _module_file(parts[:split])
        if path is None:
            continue
        rest = parts[split:]
        names = _top_level(ast.parse(path.read_text()))
        if rest[0] not in names:
            return f"{name}: {path.relative_to(ROOT)} defines no {rest[0]}"
        node = names[rest[0]]
        if len(rest) > 1 and isinstance(node, ast.ClassDef) and rest[1] not in _members(node):
            return f"{name}: class {rest[0]} has no member {rest[1]}"
        return None
    return None  # not a package name (a config field, a JAX function, ...)


def test_the_architecture_doc_exists_and_names_code():
    spans = _spans()
    assert len(spans) > 100, "docs/architecture.md lost its code references"
    assert any(s.startswith("ddpm_jax/") for s in spans) and any("." in s for s in spans)


def test_every_path_in_the_architecture_doc_exists():
    missing = []
    for span in _spans():
        for path in _PATH.findall(span):
            if "<" in path:  # a placeholder (`ddpm_jax/sampling/<name>.py`): its folder must exist
                path = path[:path.index("<")]
            if not (ROOT / path.rstrip("/.")).exists():
                missing.append(path)
    assert missing == []


def test_every_dotted_name_in_the_architecture_doc_exists():
    classes = _classes()
    problems = []
    for span in _spans():
        if span.startswith(("config.", "--")) or "/" in span or span.endswith((".py", ".md")):
            continue  # config fields, flags, paths and file names
        match = _DOTTED.match(span)
        if match:
            problem = _problem(match.group(0), classes)
            if problem:
                problems.append(problem)
    assert problems == []


def test_the_checker_sees_a_missing_name():
    classes = _classes()
    assert _problem("loop.train", classes) is None
    assert _problem("sampling.registry.resolve", classes) is None
    assert _problem("GaussianDiffusion.denoise", classes) is None
    assert _problem("loop.no_such_function", classes) is not None
    assert _problem("sampling.registry.no_such", classes) is not None
    assert _problem("GaussianDiffusion.no_such", classes) is not None
    assert _problem("jax.tree.map", classes) is None
