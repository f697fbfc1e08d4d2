"""The layout holds (issue 13): imports only go down the layers, no import loops, no module over
400 lines, and `inference/` never imports discord or the bot.

The code is read, not imported (`ast`): the check costs no torch import, and it sees the imports a
runtime check would miss — those inside functions and those under `if TYPE_CHECKING:`.

Rules, for every .py file of config/, inference/ and bot/:
- (a) an import (at module level, in a function, or under TYPE_CHECKING) may name a module of its
  own layer or of a layer below it (`LAYERS`), never one above.  TYPE_CHECKING imports count:
  they never run, but they are a dependency all the same (a reader of the lower module must know
  the upper one, and a type checker pulls it in), and every one today already points down.
- (b) the modules do not import each other in a loop, counting the imports that run when a
  module is imported (module level, TYPE_CHECKING excluded): such a loop is what breaks with a
  half-initialised module, depending on which module is imported first.  `import a.b` also
  runs `a/__init__.py` first; that implicit step is not an edge (a package's `__init__` that
  imports its own modules would be a loop otherwise, and Python handles it), `from a import X`
  naming `a` itself is.
- (c) no module is over `MAX_LINES` lines.
- (d) nothing in `inference/` imports `discord` or `bot`, in any form: the inference layer must
  run (workers, CLI, bench, issue 10's Ray backend) without the bot or its library.

Imports by string (`importlib.import_module`, the registry's "module:function" builders) are not
seen here: they are the registry's lazy references, resolved in the worker on purpose.

Existing violations are listed in `KNOWN_…` below, each with its reason.  The test fails on any
violation not listed and on any listed one that is gone, so the lists show the debt and can only
shrink.
"""

from __future__ import annotations

import ast
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("config", "inference", "bot")
MAX_LINES = 400

#: Lowest first: a module may import modules of its own layer and of the layers below it.
#: An entry ending in ".*" is a package and everything in it; any other entry names one module.
#: A module in no layer fails `test_every_module_is_in_a_layer`: a new one must be placed here.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("config", ("config.*",)),
    # What every room of `inference` shares and which itself imports no other room: the errors,
    # the pipeline contract (`Prediction`, `Pipeline`) and the generic batcher.
    ("inference core", ("inference", "inference.errors", "inference.pipeline", "inference.batching")),
    # Below the models: the decoder, the presets, the weights store, the task and model
    # registry, and the safe readers of weights files that the models load with.
    (
        "below the models",
        (
            "inference.images",
            "inference.image_checks",
            "inference.decode_cost",
            "inference.presets",
            "inference.weights",
            "inference.catalogue",
            "inference.atomic",
            "inference.tasks",
            "inference.registry",
            "inference.checkpoint",
            "inference.checkpoint_scan",
            "inference.unpickle",
        ),
    ),
    ("models", ("inference.models.*",)),
    # How a model runs: export to ONNX (torch, in a short-lived process), the cache of exported
    # files, and the torch-free ONNX Runtime pipelines that the workers load from it.
    ("runtime", ("inference.runtime.*",)),
    ("worker", ("inference.worker.*",)),
    ("service", ("inference.service.*",)),
    # The Ray Serve application (`serve run inference.serve_app:app`): deployments over the workers' pipelines.
    ("serve app", ("inference.serve_app",)),
    ("CLI and bench", ("inference.cli", "inference.__main__", "inference.bench", "inference.bench_modes", "inference.memory")),
    ("bot", ("bot.*",)),
)

#: Upward imports that exist today: "file → target" → why it is there and what removes it.
KNOWN_UPWARD: dict[str, str] = {}

#: Modules over MAX_LINES today: file → (the most lines it may have, why).  It may not grow; once
#: under MAX_LINES its entry must go.
KNOWN_LONG: dict[str, tuple[int, str]] = {
    # The store alone (download, verify, atomic install), its catalogue and atomic writes already
    # moved out; 259 of its lines are the one class `WeightsStore`.  Not this test's to split.
    "inference/weights.py": (411, "one class, WeightsStore, is most of it"),
    # Encoder, language model (with its beam search) and pipeline in one file; the language model
    # (`LSTMCore`, `FCCaptionModel`, ~160 lines) is the natural room of its own.
    "inference/models/captioner.py": (405, "encoder, language model and pipeline in one file"),
}

#: Import loops that exist today, as `import_cycles` words them → why.
KNOWN_CYCLES: dict[str, str] = {}


# --- reading the code ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    path: str  # its file, relative to the root
    line: int
    #: The module imported: a project module (the longest dotted prefix that is one), or, for
    #: anything else, the name as written ("torch.nn", "discord").
    target: str
    #: True when the import runs as the importer is imported: not in a function, not under
    #: `if TYPE_CHECKING:`.
    module_level: bool

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line} → {self.target}"

    @property
    def key(self) -> str:
        """How an allow-list names it: without the line, which moves with every edit above it."""
        return f"{self.path} → {self.target}"


def project_files(root: Path) -> list[Path]:
    """The .py files of the three packages that git tracks or would (untracked but not ignored:
    new modules not committed yet); every .py file outside `__pycache__` where there is no git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *PACKAGES],
            cwd=root, capture_output=True, check=True, timeout=60,
        ).stdout.decode().split("\0")
        files = {root / name for name in listed if name.endswith(".py")}
    except (OSError, subprocess.SubprocessError):
        files = {path for package in PACKAGES for path in (root / package).rglob("*.py")}
    # A tracked file deleted in the working tree (a module split into a package) is not code.
    return sorted(path for path in files if path.is_file() and "__pycache__" not in path.parts)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_imports(root: Path, files: Iterable[Path]) -> tuple[dict[str, Path], list[Import]]:
    """Every module of `files` (name → file) and every import in them, targets resolved."""
    modules = {module_name(root, path): path for path in files}
    imports: list[Import] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, module_level in _walk(tree, module_level=True):
            # One entry per target and line: `from a import b, c` imports `a` once.
            for target in dict.fromkeys(_targets(node, name, is_package, modules)):
                imports.append(Import(name, path.relative_to(root).as_posix(), node.lineno, target, module_level))
    return modules, imports


def _walk(node: ast.AST, module_level: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """The import statements under `node`, each with whether it runs at import time."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, module_level
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _walk(child, module_level=False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.body:
                yield from _walk(ast.Module(body=[statement], type_ignores=[]), module_level=False)
            for statement in child.orelse:
                yield from _walk(ast.Module(body=[statement], type_ignores=[]), module_level)
        else:  # class bodies, try/with/if blocks: they run at import time
            yield from _walk(child, module_level)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [_project_module(alias.name, modules) for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importer's package, one level up per extra dot
        package = importer if is_package else importer.rpartition(".")[0]
        anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    # `from pkg import name` imports the submodule pkg.name when there is one, else pkg itself.
    return [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else _project_module(base, modules)
        for alias in node.names
    ]


def _project_module(name: str, modules: dict[str, Path]) -> str:
    """The longest dotted prefix of `name` that is a module of ours (`from inference.worker
    import X` → inference.worker), or `name` itself for anything else."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return name


# --- the rules ----------------------------------------------------------------------------------


def layer_of(module: str) -> int | None:
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            package = entry.removesuffix(".*")
            if module == entry or (entry.endswith(".*") and (module == package or module.startswith(package + "."))):
                return index
    return None


def upward_imports(imports: Iterable[Import], modules: dict[str, Path]) -> list[Import]:
    found = []
    for imported in imports:
        if imported.target not in modules:
            continue  # torch, discord…: not a layer of ours
        source, target = layer_of(imported.source), layer_of(imported.target)
        if source is not None and target is not None and target > source:
            found.append(imported)
    return found


def describe_upward(imported: Import) -> str:
    source, target = LAYERS[layer_of(imported.source)][0], LAYERS[layer_of(imported.target)][0]
    return f"{imported.where} ({source} imports {target}, a layer above it)"


def forbidden_in_inference(imports: Iterable[Import]) -> list[Import]:
    return [
        imported
        for imported in imports
        if imported.source.split(".")[0] == "inference" and imported.target.split(".")[0] in ("discord", "bot")
    ]


def import_cycles(imports: Iterable[Import], modules: dict[str, Path]) -> list[str]:
    """Each loop of module-level imports between our modules, as "a → b → a", from the loop's
    alphabetically first module (so that its wording is stable), with where each import is."""
    edges: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for imported in imports:
        if imported.module_level and imported.target in modules:
            edges[imported.source].setdefault(imported.target, imported)
    cycles = []
    for component in _strongly_connected(edges):
        start = min(component)
        if len(component) == 1 and start not in edges[start]:
            continue  # a module alone, not importing itself: no loop
        path = _path_back(edges, start, component)
        cycles.append(" → ".join(path) + "  (" + "; ".join(edges[a][b].where for a, b in zip(path, path[1:])) + ")")
    return sorted(cycles)


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative: the sets of modules that can each reach all the others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def _path_back(edges: dict[str, dict[str, Import]], start: str, component: set[str]) -> list[str]:
    """A shortest loop from `start` back to itself inside `component` (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node]):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child in component and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no loop through {start}")  # a component of two or more always has one


def long_modules(root: Path, files: Iterable[Path]) -> dict[str, int]:
    lengths = {path.relative_to(root).as_posix(): len(path.read_text(encoding="utf-8").splitlines()) for path in files}
    return {path: lines for path, lines in lengths.items() if lines > MAX_LINES}


# --- the project --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, Path], list[Import]]:
    return read_imports(REPO_ROOT, project_files(REPO_ROOT))


def test_the_check_reads_the_whole_project(project):
    """An empty listing (git missing, a wrong root) would pass every rule below without reading a line."""
    modules, imports = project
    assert {"config.settings", "inference.checkpoint", "inference.models.classifier", "bot.client"} <= modules.keys()
    targets = {(imported.source, imported.target) for imported in imports}
    assert ("inference.models.classifier", "inference.checkpoint") in targets
    assert ("inference.checkpoint", "torch") in targets


def test_every_module_is_in_a_layer(project):
    modules, _ = project
    unplaced = sorted(name for name in modules if layer_of(name) is None)
    assert not unplaced, f"modules in no layer (place each in LAYERS, tests/test_layout.py): {unplaced}"


def test_imports_only_go_down_the_layers(project):
    modules, imports = project
    found = upward_imports(imports, modules)
    new = [describe_upward(imported) for imported in found if imported.key not in KNOWN_UPWARD]
    gone = sorted(set(KNOWN_UPWARD) - {imported.key for imported in found})
    assert not new, "imports up the layers:\n" + "\n".join(new)
    assert not gone, f"fixed: remove these from KNOWN_UPWARD: {gone}"


def test_inference_never_imports_discord_or_the_bot(project):
    _, imports = project
    assert not [imported.where for imported in forbidden_in_inference(imports)]


def test_no_import_loops(project):
    modules, imports = project
    cycles = import_cycles(imports, modules)
    keys = {cycle.partition("  (")[0] for cycle in cycles}
    new = [cycle for cycle in cycles if cycle.partition("  (")[0] not in KNOWN_CYCLES]
    assert not new, "import loops at module level:\n" + "\n".join(new)
    assert not set(KNOWN_CYCLES) - keys, f"fixed: remove these from KNOWN_CYCLES: {sorted(set(KNOWN_CYCLES) - keys)}"


def test_no_module_is_over_the_line_limit(project):
    modules, _ = project
    long = long_modules(REPO_ROOT, modules.values())
    new = [f"{path}: {lines} lines" for path, lines in long.items() if lines > KNOWN_LONG.get(path, (MAX_LINES, ""))[0]]
    gone = sorted(set(KNOWN_LONG) - set(long))
    assert not new, f"modules over {MAX_LINES} lines (or grown past their KNOWN_LONG entry):\n" + "\n".join(new)
    assert not gone, f"now under {MAX_LINES} lines: remove these from KNOWN_LONG: {gone}"


# --- the check itself, on a miniature project -----------------------------------------------------


def _miniature(root: Path, files: dict[str, str]) -> tuple[dict[str, Path], list[Import]]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return read_imports(root, sorted(root / name for name in files))


def test_upward_imports_are_found_wherever_they_are_written(tmp_path):
    modules, imports = _miniature(
        tmp_path,
        {
            "config/__init__.py": "",
            "inference/__init__.py": "",
            "inference/models/__init__.py": "",
            "inference/models/cyclegan.py": "from inference import images\n",  # down: fine
            "inference/service/__init__.py": "",
            "inference/images.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from inference.service import X\n"  # line 3
                "def f():\n    import inference.models.cyclegan\n"  # line 5
                "from .models import cyclegan\n"  # line 6, relative
                "import config\n"  # down: fine
            ),
            "config/settings.py": "import bot.client\n",  # line 1
            "bot/__init__.py": "",
            "bot/client.py": "from inference.service import X\n",  # down: fine
        },
    )
    assert sorted(describe_upward(imported) for imported in upward_imports(imports, modules)) == [
        "config/settings.py:1 → bot.client (config imports bot, a layer above it)",
        "inference/images.py:3 → inference.service (below the models imports service, a layer above it)",
        "inference/images.py:5 → inference.models.cyclegan (below the models imports models, a layer above it)",
        "inference/images.py:6 → inference.models.cyclegan (below the models imports models, a layer above it)",
    ]


def test_discord_and_the_bot_are_found_in_inference(tmp_path):
    modules, imports = _miniature(
        tmp_path,
        {
            "inference/__init__.py": "",
            "inference/cli.py": "def f():\n    from discord.ext import commands\n",
            "bot/__init__.py": "import discord\n",  # the bot may
        },
    )
    assert [imported.where for imported in forbidden_in_inference(imports)] == ["inference/cli.py:2 → discord.ext"]


def test_loops_are_found_at_module_level_only(tmp_path):
    modules, imports = _miniature(
        tmp_path,
        {
            "inference/__init__.py": "",
            "inference/service/__init__.py": "from inference.service.lane import Lane\n",
            "inference/service/lane.py": "from inference.service import TASKS\n",  # the package's own init: a loop
            "inference/service/api.py": "def f():\n    from inference.service import local\n",
            "inference/service/local.py": "import inference.service.api\n",  # api imports it back lazily: no loop
        },
    )
    assert import_cycles(imports, modules) == [
        "inference.service → inference.service.lane → inference.service  "
        "(inference/service/__init__.py:1 → inference.service.lane; "
        "inference/service/lane.py:1 → inference.service)"
    ]


def test_long_modules_are_found(tmp_path):
    _miniature(tmp_path, {"bot/short.py": "x = 1\n" * MAX_LINES, "bot/long.py": "x = 1\n" * (MAX_LINES + 1)})
    assert long_modules(tmp_path, sorted(tmp_path.rglob("*.py"))) == {"bot/long.py": MAX_LINES + 1}
