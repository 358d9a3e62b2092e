"""The shape of the package, as the README's "Where things are" describes it: files of one job and readable
length, imports that run one way (the command line on top, the serving and sweep wings below it, the library
under them), and no circle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "fmnist"
MODULES = {".".join(path.with_suffix("").relative_to(PACKAGE.parent).parts).removesuffix(".__init__"): path
           for path in sorted(PACKAGE.rglob("*.py"))}
# Who may import whom: a module of a layer imports only from its own layer and the ones below it.
LAYERS = [("fmnist.cli",), ("fmnist.sweep", "fmnist.serve"), ("fmnist",)]
TRAINING = ("fmnist.train", "fmnist.model", "fmnist.checkpoint", "fmnist.export", "fmnist.data", "fmnist.evaluation",
            "fmnist.tensorboard", "fmnist.summary", "fmnist.sweep")


def layer(module: str) -> int:
    return next(i for i, prefixes in enumerate(LAYERS)
                if any(module == p or module.startswith(p + ".") for p in prefixes))


def imports(path: Path) -> set[str]:
    """The fmnist modules a file imports, at any depth (inside functions too, and for type hints alone)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fmnist":
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fmnist"}
    return {name for name in found if name in MODULES}


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_file_of_the_package_is_over_400_lines():   # page.html too
    long = {str(path): n for path in PACKAGE.rglob("*") if path.is_file() and path.suffix in (".py", ".html")
            and (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


@pytest.mark.parametrize("module", MODULES)
def test_each_function_is_under_60_lines_and_each_command_body_under_25(module):
    path = MODULES[module]
    for function in functions(path):
        start = min([function.lineno] + [d.lineno for d in function.decorator_list])
        body = function.body[0].lineno if module == "fmnist.cli.commands" and function.args.args else start
        # a typer command may be longer by its option declarations alone: its body under 25 lines
        limit = 25 if body != start else 60
        assert function.end_lineno - body + 1 <= limit, f"{path}:{function.lineno} {function.name}"


@pytest.mark.parametrize("module", MODULES)
def test_imports_run_down_the_layers_and_the_serving_wing_stays_off_torch(module):
    for imported in imports(MODULES[module]):
        assert layer(imported) >= layer(module) or imported == "fmnist", f"{module} imports {imported}, above it"
        if module.startswith("fmnist.serve"):
            assert not imported.startswith(TRAINING), f"{module} imports {imported}, a training module"
        if module.startswith("fmnist.sweep"):
            assert not imported.startswith("fmnist.serve"), f"{module} imports {imported}: wings stay apart"


def test_no_import_circle():
    graph = {module: imports(path) - {module} for module, path in MODULES.items()}
    graph = {module: {i for i in deps if i != "fmnist" and not module.startswith(i + ".")}
             for module, deps in graph.items()}

    def reach(start: str, seen: set[str]) -> None:
        for next_module in graph[start]:
            assert next_module != module, f"{module} reaches itself through {sorted(seen)}"
            if next_module not in seen:
                seen.add(next_module)
                reach(next_module, seen)

    for module in graph:
        reach(module, set())
