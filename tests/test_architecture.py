"""The house rules, checked from the source: dependencies point down, the CLI is the top.

The import graph is built from the AST of every module of ``dynaslice/``, imports inside
functions included (a cycle hidden in a function still makes modules depend on each other, and
only avoids failing at import time by luck). Imports under ``if TYPE_CHECKING:`` are left out:
they never run and exist for type hints only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dynaslice

ROOT = Path(dynaslice.__file__).parent


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The package's modules that ``path`` imports (``from x import name`` of a submodule counts as it)."""
    top = root.name
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != top:
                continue
            for alias in node.names:  # `from . import runs` imports the submodule runs
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imports_of(p, modules, root) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_only_the_cli_imports_the_cli():
    offenders = {
        m: sorted(d for d in deps if d == "dynaslice.cli" or d.startswith("dynaslice.cli."))
        for m, deps in import_graph().items()
        if not (m == "dynaslice.cli" or m.startswith("dynaslice.cli.") or m == "dynaslice.__main__")
    }
    assert {m: d for m, d in offenders.items() if d} == {}


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        # serving and model code never reaches into training
        ("dynaslice.budget", "dynaslice.train"),
        ("dynaslice.dynamic", "dynaslice.train"),
        ("dynaslice.modelfile", "dynaslice.train"),
        ("dynaslice.onnx_export", "dynaslice.train"),
        ("dynaslice.onnx_package", "dynaslice"),  # copied alone onto deployment targets: no dynaslice at all
        ("dynaslice.gate", "dynaslice.train"),
        ("dynaslice.models", "dynaslice.gate"),
        # the channel-group engine sits under everything that slices, prunes or orders channels
        ("dynaslice.graph", "dynaslice.models"),
        ("dynaslice.graph", "dynaslice.prune"),
        ("dynaslice.graph", "dynaslice.ordering"),
        ("dynaslice.nn", "dynaslice.graph"),
    ],
)
def test_layers_point_down(layer, forbidden):
    graph = import_graph()
    bad = {
        m: sorted(d for d in deps if d == forbidden or d.startswith(forbidden + "."))
        for m, deps in graph.items()
        if m == layer or m.startswith(layer + ".")
    }
    assert {m: d for m, d in bad.items() if d} == {}


CONFIG_SECTIONS = ("dynaslice.train.stage2_settings", "dynaslice.train.ffsd_settings", "dynaslice.prune_settings")
"""Config sections defined next to the code that uses them, aggregated by ``train.config.Config``."""


def test_config_sections_import_only_the_config_base():
    """The aggregate ``Config`` imports every section, so a section may import only the bottom of
    the config machinery (``dynaslice.config_base``), which imports no dynaslice module: else the
    section's package pulls the training code back into ``train.config`` (an import cycle)."""
    graph = import_graph()
    assert graph["dynaslice.config_base"] == set()
    assert {s: sorted(graph[s] - {"dynaslice.config_base"}) for s in CONFIG_SECTIONS} == {s: [] for s in CONFIG_SECTIONS}


def test_the_checker_sees_cycles_through_function_level_imports(tmp_path):
    """The checker itself, on a tiny package: a cycle hidden in a function body is found, one
    under TYPE_CHECKING is not (it never runs)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import B\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\nB = 1\n")
    assert find_cycle(import_graph(pkg)) is None
    (pkg / "sub" / "b.py").write_text("B = 1\ndef g():\n    from .. import a\n    return a\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.sub.b"}


def test_no_function_is_longer_than_about_80_lines():
    """Long functions hide several jobs; the few that are one job written out say why beside them."""
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 85 and "long-function:" not in "\n".join(lines[node.lineno - 3 : node.lineno + 2]):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


# --------------------------------------------------------------------------- one session factory

# Every onnxruntime session of the library, its serving layer and its benchmarks comes from
# dynaslice.onnx_package.open_session, so that a benchmark times the configuration users run (threads,
# spinning, optimisation level, providers and log level are chosen there and nowhere else).
FACTORY = ("dynaslice/onnx_package.py", "open_session")
SESSION_NAMES = {"InferenceSession", "SessionOptions"}


def session_uses(path: Path) -> list[tuple[str, int]]:
    """``(enclosing function, line)`` of every use of onnxruntime's ``InferenceSession`` or
    ``SessionOptions`` in ``path``: an attribute (``ort.InferenceSession``), a name imported from
    onnxruntime under any alias, or the string a ``getattr`` would look up. Text in docstrings
    and comments is no use."""
    tree = ast.parse(path.read_text())
    aliases = set(SESSION_NAMES)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "onnxruntime":
            aliases.update(a.asname or a.name for a in node.names if a.name in SESSION_NAMES)
    uses: list[tuple[str, int]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            function = f"{function}.{node.name}" if function else node.name
        used = (
            (isinstance(node, ast.Attribute) and node.attr in SESSION_NAMES)
            or (isinstance(node, ast.Name) and node.id in aliases)
            or (isinstance(node, ast.Constant) and node.value in SESSION_NAMES)
        )
        if used:
            uses.append((function or "<module>", node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "")
    return uses


def test_one_function_makes_every_onnxruntime_session():
    """No session and no SessionOptions outside ``dynaslice.onnx_package.open_session``, in the library
    or in the benchmarks: a benchmark with its own options would time what users do not run."""
    repo = ROOT.parent
    files = sorted([*ROOT.rglob("*.py"), *(repo / "bench").rglob("*.py")])
    found = {
        (str(path.relative_to(repo)), function, line)
        for path in files
        for function, line in session_uses(path)
    }
    assert {(f, fn) for f, fn, _ in found} == {FACTORY}, sorted(u for u in found if u[:2] != FACTORY)


def test_the_session_scan_sees_aliases_and_not_docstrings(tmp_path):
    """The checker itself: a call through an aliased import, an attribute and a ``getattr`` string
    are found, each in its function; a docstring that names ``InferenceSession(`` is not."""
    path = tmp_path / "m.py"
    path.write_text(
        '"""Calls InferenceSession(path) somewhere."""\n'
        "import onnxruntime as ort\n"
        "from onnxruntime import InferenceSession as Make\n"
        "def a():\n    return Make(b'')\n"
        "class B:\n    def c(self):\n        return ort.SessionOptions()\n"
        "def d():\n    return getattr(ort, 'InferenceSession')\n"
    )
    assert sorted(session_uses(path)) == [("B.c", 8), ("a", 5), ("d", 10)]


def _relu_graph(path: Path) -> Path:
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("input", "output")]
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "relu", io[:1], io[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def _settings(session) -> dict:
    options = session.get_session_options()
    try:
        spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: onnxruntime's default, spinning on
        spinning = None
    return {
        "intra_op_threads": options.intra_op_num_threads,
        "inter_op_threads": options.inter_op_num_threads,
        "spinning": spinning,
        "optimisation": str(options.graph_optimization_level),
        "log_severity": options.log_severity_level,
        "providers": session.get_providers(),
    }


def test_every_session_has_the_factory_options(tmp_path, monkeypatch):
    """The runners, serving and the benchmarks' calls get the same options: every graph
    optimisation, one inter-op thread, no spinning, errors only; threads as asked (serving:
    torch's count), the CPU provider here and the CUDA provider first on a CUDA device."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import torch

    from dynaslice.onnx_package import OnnxModel, open_session
    from dynaslice.serve import runtimes

    path = _relu_graph(tmp_path / "relu.onnx")
    common = {
        "inter_op_threads": 1,
        "spinning": "0",
        "optimisation": "GraphOptimizationLevel.ORT_ENABLE_ALL",
        "log_severity": 3,
        "providers": ["CPUExecutionProvider"],
    }
    assert _settings(open_session(path, threads=2)) == {**common, "intra_op_threads": 2}
    assert _settings(open_session(path, data=path.read_bytes())) == {**common, "intra_op_threads": 0}
    assert _settings(OnnxModel(path).session) == {**common, "intra_op_threads": 0}  # onnxruntime's default
    served = runtimes.ort_session(path, torch.device("cpu"))
    assert _settings(served) == {**common, "intra_op_threads": torch.get_num_threads()}

    asked = {}
    monkeypatch.setattr(
        runtimes, "open_session", lambda path, providers, **kw: asked.update(providers=providers)
    )
    runtimes.ort_session(path, torch.device("cuda"))
    assert asked["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# --------------------------------------------------------------------------- method registries

# Pruning methods, samplers and training targets plug in one way: a decorator with the method's
# name, in the method's own module, whose registry is then the only list of the names. The config
# module, the commands and the pruning run learn them from the registries.
REGISTRATIONS = {
    "register_pruner": "pruner_names",
    "register_sampler": "sampler_names",
    "register_target": "target_names",
    "register_binary": "binary_method_names",
}
NAMELESS = ["dynaslice/train/config.py", "dynaslice/pipeline.py", "dynaslice/prune/run.py", "dynaslice/prune/registry.py",
            *sorted(str(p.relative_to(ROOT.parent)) for p in (ROOT / "cli").glob("*.py"))]  # fmt: skip


def registered_in_source(root: Path = ROOT) -> dict[str, list[str]]:
    """``register_X -> [name, ...]`` from every ``@register_X("name", ...)`` decorator under ``root``."""
    found: dict[str, list[str]] = {kind: [] for kind in REGISTRATIONS}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.ClassDef):
                continue
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Name) and dec.func.id in found:
                    assert dec.args and isinstance(dec.args[0], ast.Constant), f"{path}:{dec.lineno}: name not literal"
                    found[dec.func.id].append(dec.args[0].value)
    return found


def _registries() -> dict[str, tuple[object, tuple[str, ...]]]:
    import dynaslice.cli  # noqa: F401  (every command, so every method module, imported)
    from dynaslice import prune
    from dynaslice.binary import methods as binary
    from dynaslice.train import samplers, targets

    modules = {"register_pruner": prune, "register_sampler": samplers, "register_target": targets, "register_binary": binary}
    return {kind: (getattr(modules[kind], kind), getattr(modules[kind], names)()) for kind, names in REGISTRATIONS.items()}


def test_every_method_is_one_decorator_in_its_own_module():
    source = registered_in_source()
    for kind, (_, names) in _registries().items():
        assert sorted(source[kind]) == sorted(names), kind  # nothing registered another way


def test_the_registries_take_the_same_shape():
    """``register_X(name, *, ..., check=None)``: a name, then keywords only, one of them the
    method's own config rules."""
    import inspect

    for kind, (register, _) in _registries().items():
        params = list(inspect.signature(register).parameters.values())
        assert params[0].name == "name" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, kind
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), kind
        assert "check" in {p.name for p in params[1:]}, kind


def _field_default(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """A config dataclass field's default (``sampler: str = "sandwich"``): the one place a default
    method is named."""
    parent = parents.get(node)
    return isinstance(parent, ast.AnnAssign) and parent.value is node and isinstance(parents.get(parent), ast.ClassDef)


def method_name_literals(path: Path, names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return [
        f"{path.name}:{node.lineno} {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and not _field_default(node, parents)
    ]


def test_method_names_are_listed_only_by_their_registries():
    names = {n for _, registered in _registries().values() for n in registered}
    found = [hit for rel in NAMELESS for hit in method_name_literals(ROOT.parent / rel, names)]
    assert found == []


def test_the_name_checker_sees_a_listed_name(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('from dataclasses import dataclass\n@dataclass\nclass C:\n    m: str = "l1"\n'
                    'def f(m):\n    return m in ("l1", "dcff")\n')  # fmt: skip
    assert method_name_literals(path, {"l1", "dcff"}) == ["m.py:6 'l1'", "m.py:6 'dcff'"]


# --------------------------------------------------------------------------- one front end per form

# A gated model runs in three forms -- the torch module (GatedSupernet, DynamicNet), the onnxruntime
# runner (onnx_package) and the served object (serve) -- and all three split a batch by route with
# one function, onnx_package.run_grouped. An exported package is opened and run by the onnxruntime
# form alone: serve.load wraps its runners and reads no manifest, no package file, no session itself.
FORM_FILES = ["dynaslice/onnx_package.py", "dynaslice/dynamic.py", "dynaslice/gate/gated.py",
              *sorted(str(p.relative_to(ROOT.parent)) for p in (ROOT / "serve").glob("*.py"))]  # fmt: skip
GROUPING_OPS = {"unique", "nonzero", "flatnonzero", "argwhere", "index_select", "index_copy", "index_copy_", "index_put_"}
PACKAGE_READING = {"read_manifest", "package_sessions", "package_members", "read_package_file", "check_package_graphs"}
PACKAGE_RULES = "dynaslice/onnx_package.py"


def calls_of(path: Path, names: set[str], on: str | None = None) -> list[tuple[str, int, str]]:
    """``(enclosing function, line, name)`` of every call in ``path`` of a function or method
    named in ``names``; with ``on``, only methods called on something named ``on``
    (``session.run``, ``self.session.run``)."""
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            function = f"{function}.{node.name}" if function else node.name
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            owner = f.value if isinstance(f, ast.Attribute) else None
            owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
            if name in names and (on is None or owner_name == on):
                found.append((function or "<module>", node.lineno, name))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text()), "")
    return found


def _callers(files: list[str], names: set[str], on: str | None = None) -> set[tuple[str, str]]:
    return {(f, fn) for f in files for fn, _, _ in calls_of(ROOT.parent / f, names, on)}


def test_route_grouping_is_written_once():
    """Only ``onnx_package.run_grouped`` groups samples by route (no ``unique``/``nonzero``/index
    copies anywhere else in the forms), and each form's batched forward calls it."""
    assert _callers(FORM_FILES, GROUPING_OPS) == {(PACKAGE_RULES, "run_grouped")}
    assert _callers(FORM_FILES, {"run_grouped"}) == {
        ("dynaslice/gate/gated.py", "GatedSupernet.forward_routes"),  # the torch module (DynamicNet)
        (PACKAGE_RULES, "run_gated"),  # the onnxruntime form
        ("dynaslice/serve/served.py", "ServedGated.forward_with_routes"),  # served on torch runtimes
    }


def test_packages_are_opened_and_run_by_the_onnxruntime_form_alone():
    """A package's sessions are opened by the runners only; serving reads nothing of a package
    and runs no session but through a piece; the gated onnxruntime forward is one function."""
    everywhere = sorted(str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py"))
    assert _callers(everywhere, {"package_sessions"}) == {
        (PACKAGE_RULES, "GatedOnnxRunner.__init__"),
        (PACKAGE_RULES, "BudgetOnnxRunner.__init__"),
    }
    serve = [f for f in FORM_FILES if f.startswith("dynaslice/serve/")]
    assert _callers(serve, PACKAGE_READING) == set()
    assert _callers(serve, {"open_package"}) == {("dynaslice/serve/__init__.py", "_load_onnx")}
    assert _callers(serve, {"run"}, on="session") == {("dynaslice/serve/runtimes.py", "OrtPiece.__call__")}
    assert _callers(FORM_FILES, {"run_gated"}) == {
        (PACKAGE_RULES, "GatedOnnxRunner.forward_with_routes"),
        ("dynaslice/serve/served.py", "ServedGated.forward_with_routes"),
    }


def test_the_call_scan_sees_methods_and_their_owner(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("class A:\n    def f(self, s):\n        return self.session.run(None), s.run(), x.unique()\n"
                    "def g(h):\n    return run_grouped(h)\n")  # fmt: skip
    assert calls_of(path, {"run"}, on="session") == [("A.f", 3, "run")]
    assert sorted(calls_of(path, {"unique", "run_grouped"})) == [("A.f", 3, "unique"), ("g", 5, "run_grouped")]


# --------------------------------------------------------------------------- names that say what they are

ARCH_PARSER = "dynaslice/archspec.py"
ARCH_WORDS = {"largest", "smallest"}  # ("uniform" and "routes" are also row kinds and manifest keys)


def arch_string_reading(path: Path) -> list[str]:
    """Where ``path`` reads an arch string itself: a comparison with an arch word (``t == "largest"``,
    ``t in ("largest", "smallest")``) or a ratio's ``x`` stripped (``removeprefix("x")``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [e for c in node.comparators for e in (c.elts if isinstance(c, ast.Tuple | ast.Set) else [c])]
            consts = [c for c in sides if isinstance(c, ast.Constant)]
            if any(c.value in ARCH_WORDS for c in consts if isinstance(c.value, str)):
                found.append(f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if node.func.attr in ("removeprefix", "lstrip") and args == ["x"]:
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_arch_strings_are_parsed_by_one_function():
    """Only ``archspec`` reads an arch named in text; the commands and ``serve.load`` call it."""
    files = sorted(p for p in ROOT.rglob("*.py") if str(p.relative_to(ROOT.parent)) != ARCH_PARSER)
    assert [hit for p in files for hit in arch_string_reading(p)] == []
    assert arch_string_reading(ROOT.parent / ARCH_PARSER) != []
    callers = _callers(sorted(str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")), {"parse_arch", "parse_archs"})
    assert {f for f, _ in callers} >= {"dynaslice/cli/export.py", "dynaslice/cli/train.py", "dynaslice/serve/__init__.py"}


def test_the_arch_scan_sees_a_second_parser(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('def f(t):\n    if t in ("largest", "smallest"):\n        return t\n    return float(t.removeprefix("x"))\n')
    assert arch_string_reading(path) == ["m.py:2", "m.py:4"]


# One name, one meaning: a public module-level function name is defined in one module of
# dynaslice/, except where every definition means the same thing for its own kind of object.
SAME_MEANING = {
    "register": "a command module's hook that adds its subcommand to the parser (dynaslice/cli/*)",
    "count_macs": "MACs per input of a subnet: counting.py for image supernets, lm/ for LM supernets",
    "count_params": "parameters of a subnet: counting.py for image supernets, lm/ for LM supernets",
}
# ``validate`` checks a value against its rules and returns it (a config, an arch), nothing else:
# the trainers' hook that evaluates on the validation split is ``evaluate_validation``.
VALIDATORS = {"dynaslice/train/config.py:Config", "dynaslice/binary/train.py:BinaryConfig", "dynaslice/space.py:SearchSpace"}


def public_functions(root: Path = ROOT) -> dict[str, list[str]]:
    """``{name: [file, ...]}`` of every public module-level function under ``root``."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
                found.setdefault(node.name, []).append(str(path.relative_to(root.parent)))
    return found


def methods_named(name: str, root: Path = ROOT) -> set[str]:
    return {
        f"{path.relative_to(root.parent)}:{cls.name}"
        for path in sorted(root.rglob("*.py"))
        for cls in ast.walk(ast.parse(path.read_text()))
        if isinstance(cls, ast.ClassDef)
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and node.name == name
    }


def test_one_public_function_name_means_one_thing():
    shared = {name: files for name, files in public_functions().items() if len(files) > 1}
    assert {n: f for n, f in shared.items() if n not in SAME_MEANING} == {}
    assert set(SAME_MEANING) <= set(shared)  # no stale entries


def test_validate_only_checks_a_value():
    assert methods_named("validate") == VALIDATORS


def test_the_name_scan_sees_a_duplicate(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("def accuracy(m, b):\n    pass\ndef _private():\n    pass\n")
    (pkg / "sub" / "b.py").write_text("def accuracy(net, arch, b):\n    pass\nclass T:\n    def validate(self):\n        pass\n")
    assert public_functions(pkg)["accuracy"] == ["pkg/a.py", "pkg/sub/b.py"]
    assert "_private" not in public_functions(pkg)
    assert methods_named("validate", pkg) == {"pkg/sub/b.py:T"}
