"""The package's imports flow one way (README "Architecture"): cli -> train / generate -> adapter ->
layer -> native, files through io. Read from the source (every import, also the ones inside
functions), so a module that calls back up fails here rather than at a reader's desk."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "tlora"

# Lower numbers sit lower: a module may import modules of its own level or below, never above.
LEVELS = {
    "_native": 0,
    # demo/'s world and tokenizer are plain data, also used by testing/ (the tiny CLIP's vocabulary)
    "errors": 1,
    "options": 1,  # the options' choices and limits, for the parser and the library
    "prompt_sets": 1,  # evaluation prompt sets, plain data
    "timesteps": 1,
    "files.atomic": 1,
    "demo.world": 1,
    "demo.tokenizer": 1,
    "layer.factors": 2,
    "config": 2,
    "adapter.quantized": 2,
    "images": 2,
    "demo.concepts": 2,
    "testing.tiny": 2,  # tiny models from configs, for tests and benchmarks
    "testing.tiny_families": 2,  # the other trained families' tiny pipelines
    "testing.train_inputs": 2,
    "demo.metrics": 3,
    "demo.pretrain": 3,
    "layer.folds": 3,
    "layer.ranks": 3,
    "layer.ops": 4,
    "layer.linear": 5,
    "layer": 6,
    "adapter.targets": 7,
    "adapter.peft_config": 7,  # a peft.LoraConfig as inject's settings
    "adapter.inject": 8,
    "files.foreign.common": 9,  # the parsers' shared checks
    "files.foreign.reference": 9,
    "files.foreign.lycoris": 9,
    "files.foreign": 9,  # read_foreign: the layout's parser, then the common checks
    "files.io": 10,
    "pipelines": 10,
    "files.export.common": 11,  # the baking the writers share
    "files.export.diffusers": 11,
    "files.export.peft": 11,
    "files.export.kohya": 11,
    "files.export": 11,  # export, the writers' registry
    "files.folder": 12,  # save_pretrained: tlora's file and the static LoRA in one folder
    "files.accelerate_hooks": 13,  # accelerator.save_state / load_state of an adapter
    "train.prompts": 2,  # the training prompts' placeholders and captions
    "train.optim": 2,  # optimizers, lr schedules and the EMA (checkpoint reads their state schemas)
    # the families' training recipes, one file each (pipelines and generate read them too)
    "train.families.base": 2,
    "train.families": 2,
    "train.checkpoint": 11,
    "train.run_folder": 12,  # the output folder's run files, its lock, and what --resume checks
    "train.drift": 3,  # the overfitting view: drift toward the training image, its chart (images)
    "evaluate": 11,
    "generate": 12,
    "protocol": 13,  # the paper's evaluation in one call: generate, then evaluate
    "train.loop": 13,
    "demo.evaluate": 13,
    "demo.run": 13,
    "testing.fuzz_corpus": 14,
    "cli": 14,
    # the rooms themselves (their __init__ files hold docstrings only)
    "adapter": 0,
    "files": 0,
    "train": 0,
    "testing": 0,
    "demo": 0,
}


# each family's recipe file (train/families/NAME.py) sits with the interface it implements
LEVELS.update(
    {f"train.families.{p.stem}": 2 for p in (PACKAGE / "train" / "families").glob("*.py") if p.stem != "__init__"}
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement except those under `if TYPE_CHECKING:` (annotations only)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (names relative to `tlora`), every room included."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files) | {"_native"}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tlora":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                full = ".".join([*target, alias.name])
                deps.add(full if full in known else ".".join(target))
        graph[name] = {d for d in deps if d in known and d not in ("", name)}
    return graph


def test_every_module_has_a_level():
    graph = import_graph()
    assert set(graph) - {""} <= set(LEVELS), sorted(set(graph) - {""} - set(LEVELS))


def test_imports_only_go_down():
    upward = [
        f"{name} -> {dep}"
        for name, deps in import_graph().items()
        if name in LEVELS
        for dep in deps
        if LEVELS.get(dep, 0) > LEVELS[name]
    ]
    assert not upward, upward


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, dep]))
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_native_module_is_imported_through_the_package():
    # `from . import _native` asks tlora.__getattr__, which imports torch first (the extension
    # links libtorch_python); `from ._native import x` or `import tlora._native` would not.
    direct = []
    for path in PACKAGE.rglob("*.py"):
        for node in _runtime_imports(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n.split(".")[-1] == "_native" or n.startswith("tlora._native") for n in names):
                direct.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not direct, direct


def test_the_graph_reader_sees_real_edges():
    # The checks above are only as good as the reader: it must find the known edges, lazy ones too.
    graph = import_graph()
    assert {"layer", "layer.factors", "config"} <= graph["adapter.inject"]
    assert "files.foreign" in graph["files.io"] and "_native" in graph["files.io"]
    assert {"files.export", "train.loop"} <= graph["cli"]  # imported inside functions
    assert "cli" in graph["testing.fuzz_corpus"]  # `from tlora import cli`, inside a function
    assert "layer.linear" not in graph["layer.folds"]  # under TYPE_CHECKING only


def test_the_native_stub_matches_the_built_module():
    # _native.pyi documents the extension; pyo3 records each binding's real signature.
    import inspect

    from tlora import _native

    stub = ast.parse((PACKAGE / "_native.pyi").read_text())
    documented = {node.name: node for node in stub.body if isinstance(node, ast.FunctionDef)}
    built = {name for name in dir(_native) if not name.startswith("_") and callable(getattr(_native, name))}
    assert set(documented) == built, (sorted(set(documented) - built), sorted(built - set(documented)))
    for name, node in documented.items():
        args = node.args
        defaults = [None] * (len(args.args) - len(args.defaults)) + [ast.literal_eval(d) for d in args.defaults]
        stubbed = [(a.arg, d) for a, d in zip(args.args, defaults, strict=True)]
        real = [
            (p.name, None if p.default is inspect.Parameter.empty else p.default)
            for p in inspect.signature(getattr(_native, name)).parameters.values()
        ]
        assert stubbed == real, name
        assert ast.get_docstring(node), f"{name} has no docstring in _native.pyi"
