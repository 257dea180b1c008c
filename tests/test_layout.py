"""The package's layers (docs/architecture.md §1): no module imports one above it, no import cycle, no mode another.

Read from the source with `ast` (every import statement, also inside functions), so a new
upward edge or cycle fails here before a reader trips over it.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ddpm_jax"

# Lowest first. A module may import modules of its own layer or of a lower one.
LAYERS = (
    ("core", ("rng", "schedules", "diffusion", "sampling", "guidance", "conditioning", "models", "timestep_sampler",
              "post_hoc_ema")),
    ("infrastructure", ("files", "parallel", "imaging", "data", "train_state", "checkpointing", "run_meta",
                        "metrics", "sampler", "preemption", "workdir_lock", "config_loading", "checkpoint_recovery",
                        "cpu_flags")),
    ("setup", ("setup", "condition_config", "super_resolution")),
    ("library", ("checks", "evaluation", "loop", "teacher")),
    ("modes", ("train", "modes", "convert")),
    ("entry point", ("main",)),
)
MODES = {"train", "modes.sample", "modes.evaluate", "modes.bpd", "modes.figures", "modes.autoencoder", "modes.phema",
         "modes.distill", "modes.consistency", "modes.cascade"}
COMPOSED_MODES = {("modes.cascade", "modes.sample")}  # the cascade is two sample runs
# Function-level imports of the package's own modules, and why they stay lazy.
LAZY_ALLOWED = {
    ("main", "metrics"), ("main", "parallel"), ("main", "checkpointing"), ("main", "checks"),
    # (all of main's: `--help` and `--print_config` without importing JAX; the modes by name, importlib)
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name or "__init__"] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[tuple[str, bool]]:
    """(imported package module, inside a function?) of every import statement in `path`."""
    tree = ast.parse(path.read_text())
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*anchor, base] if base else anchor)
                base = f"ddpm_jax.{base}" if base else "ddpm_jax"
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}"[len("ddpm_jax."):] in modules else base
                       for a in node.names]
        for target in targets:
            if not target.startswith("ddpm_jax"):
                continue
            mod = target[len("ddpm_jax."):] if target != "ddpm_jax" else "__init__"
            while mod and mod not in modules:
                mod = mod.rpartition(".")[0]
            if mod and mod != name:
                found.add((mod, id(node) in functions))
    return found


def _layer(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"ddpm_jax/{name}: no layer; add it to LAYERS in tests/test_layout.py")


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items() if name != "__init__"}


def test_no_module_imports_a_higher_layer_or_another_mode():
    upward, between_modes = [], []
    for name, imports in _graph().items():
        for target, _ in imports:
            if target == "__init__":
                continue
            if _layer(target) > _layer(name):
                upward.append(f"{name} ({LAYERS[_layer(name)][0]}) -> {target} ({LAYERS[_layer(target)][0]})")
            if name in MODES and target in MODES and (name, target) not in COMPOSED_MODES:
                between_modes.append(f"{name} -> {target}")
    assert upward == [] and between_modes == []


def test_no_import_cycle():
    graph = {name: {t for t, _ in imports if t != "__init__"} for name, imports in _graph().items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_function_level_imports_of_the_package_are_the_listed_lazy_ones():
    lazy = {(name, target) for name, imports in _graph().items() for target, inside in imports if inside}
    assert lazy <= LAZY_ALLOWED, sorted(lazy - LAZY_ALLOWED)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph is real: setup imports the sampler; a made-up upward edge is classified as such."""
    assert ("sampler", False) in _graph()["setup"]
    assert _layer("train") > _layer("setup") > _layer("sampler") > _layer("sampling")


# The code between the data and the network that must handle any condition pytree (a class label,
# caption tokens, an image): `(file, function)`, the function None for the whole module.
COND_AGNOSTIC = (("guidance.py", None), ("sampler.py", None),
                 *((f"sampling/{p.name}", None) for p in sorted((PACKAGE / "sampling").glob("*.py"))),
                 ("evaluation/bpd.py", None), ("train.py", "make_train_step"))
COND_KEYS = {"label", "y", "tokens", "context", "context_mask", "low_res", "low_res_level"}
KIND_NAMES = {"labels", "tokens", "vocab_size", "text_conditioned", "cond_key", "null_label",
              "num_classes", "captions"}


def _cond_agnostic_code():
    for file, function in COND_AGNOSTIC:
        tree = ast.parse((PACKAGE / file).read_text())
        if function is not None:
            tree = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
        yield f"{file}{':' + function if function else ''}", tree


def test_generic_code_names_no_condition_key_kind_or_dtype():
    """A batch's cond passes through guidance, the samplers, the train step and the bound as an
    opaque pytree: no key of a kind ("tokens", "label", "y"), no kind's vocabulary (labels,
    vocab_size, ...) and no int32 for a condition. int32 remains for what is int32 whatever the
    condition (timesteps t and image indices) in the samplers, the bound and the train step;
    guidance holds none."""
    found = []
    for where, tree in _cond_agnostic_code():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in COND_KEYS:
                found.append(f"{where}:{node.lineno} key {node.value!r}")
            name = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                    else node.arg if isinstance(node, (ast.arg, ast.keyword)) else None)
            if name in KIND_NAMES:
                found.append(f"{where}:{node.lineno} name {name!r}")
            if name == "int32" and where.startswith("guidance"):
                found.append(f"{where}:{node.lineno} int32")
        code = [n for n in ast.walk(tree) if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        for line in "\n".join(ast.unparse(n) for n in code if isinstance(n, ast.stmt) and not hasattr(n, "body")
                               ).splitlines():  # int32 only for t and indices, never beside a condition
            if "int32" in line and any(w in line.lower() for w in ("cond", "label", "token", "null")):
                found.append(f"{where}: int32 beside a condition: {line.strip()}")
    assert found == []
