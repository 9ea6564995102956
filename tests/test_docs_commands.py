"""Every command and code block of README.md and docs/*.md runs as written -- checked as far as is
cheap (issue 33: the README's Serving block used an undefined ``x`` and a run directory no
command writes).

Nothing is *executed* here; tests/test_readme_runs.py executes README.md's commands and Python
blocks that read the demo's run directory (``export``, ``quantize``, ``eval``, ``profile``, the In
Python and Serving blocks) against a run made by the README's own ``dynaslice run`` command, tiny
through ``--set`` overrides, with these blocks extracted by :func:`blocks`. The rest (commands that
train, benchmarks, docs/ recipes that take hours) is only parsed. What is checked, per block:

- ```bash blocks, after joining ``\\`` continuations and expanding the blocks' own variables
  (``BASE=...; $PY $BASE``, loop variables take their first value):
  - every ``dynaslice ...`` command (also ``python -m dynaslice``, ``torchrun ... -m dynaslice``)
    parses with the real argparse parser (:func:`dynaslice.cli.build_parser`);
  - ``train`` / ``run`` configs resolve (a preset or ``configs/*.yaml``) and their ``--set``
    overrides apply: keys and values are validated, no data is read;
  - ``profile MODEL`` names a registered supernet;
  - a run directory a command reads (``runs/X...``) is written by some command of the docs
    (``--out``/``--runs`` or a config's default ``runs/<name>``), and a path inside ``runs/demo``
    is one the demo writes;
  - ``python bench/X.py`` and ``pytest tests/X.py`` name existing files; ``make X`` a Makefile target;
- ```python blocks compile; every name they read is defined in the block (or named in a
  ``# given: a, b`` comment: what the reader brings); every ``dynaslice`` import and attribute chain (``ds.count_macs``,
  ``serve.load``, ``ds.BudgetNet.load``) exists; ``create_supernet("name")`` names a registered
  supernet, ``load_config("name")`` a preset; paths inside ``runs/demo`` are ones the demo writes,
  and run directories given to a ``load`` call are written by some command of the docs.

Benchmark scripts' own flags are not parsed (they build their parsers inside ``main``).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import functools
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from dynaslice import runs
from dynaslice.cli import build_parser
from dynaslice.cli.common import default_run_dir
from dynaslice.models import list_supernets
from dynaslice.pipeline import load_run_config
from dynaslice.train.config import load_config, resolve_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[tuple[str, str]]:
    """``(where, code)`` of every ```lang block: where is ``FILE:LINE`` of its first line."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in BLOCK.finditer(text):
            if m.group(1) == lang:
                line = text.count("\n", 0, m.start()) + 2
                out.append((f"{doc.relative_to(ROOT)}:{line}", m.group(2)))
    return out


# --------------------------------------------------------------------------- shell


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a bash block, as argument lists, variables expanded."""
    code = code.replace("\\\n", " ")
    variables: dict[str, str] = {}
    commands = []
    for line in code.splitlines():
        for name, first in re.findall(r"\bfor (\w+) in (\S+?);?\s", line + " "):
            variables[name] = first
        line = re.sub(r"\$\(\([^)]*\)\)", "0", line)  # $((seed % 2))
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), "0"), line)
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split, lex.commenters = True, "#"
        words, current = list(lex), []
        for word in [*words, ";"]:
            if word and set(word) <= set(";&|"):  # ; && & | end a command
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
        # a line of assignments only (BASE="..."): remember them for the lines below
        if words and all(re.fullmatch(r"[A-Za-z_]\w*=.*", w) for w in words):
            for w in words:
                name, _, value = w.partition("=")
                variables[name] = value
    return [strip_prefix(c) for c in commands if strip_prefix(c)]


def strip_prefix(cmd: list[str]) -> list[str]:
    """Drop environment assignments, ``time``, ``taskset -c N``, ``do`` and loop headers."""
    while cmd:
        if re.fullmatch(r"[A-Za-z_]\w*=.*", cmd[0]) or cmd[0] in ("time", "do"):
            cmd = cmd[1:]
        elif cmd[0] == "taskset":
            cmd = cmd[3:]
        else:
            break
    return [] if not cmd or cmd[0] in ("for", "done", "wait", "cd", "git") else cmd


def dynaslice_args(cmd: list[str]) -> list[str] | None:
    """The arguments after ``dynaslice`` (or ``python -m dynaslice``, ``torchrun ... -m dynaslice``)."""
    if cmd[0] == "dynaslice":
        return cmd[1:]
    if cmd[0] in ("python", "python3", "torchrun") and "-m" in cmd:
        i = cmd.index("-m")
        if i + 1 < len(cmd) and cmd[i + 1] in ("dynaslice", "dynaslice.cli"):
            return cmd[i + 2 :]
    return None


@functools.cache
def produced_run_dirs() -> frozenset[str]:
    """``runs/X`` directories some command of the docs writes (``--out``, ``--runs``, a config's
    default ``runs/<name>``), also in comments: a block may say how an input was made."""
    out = {"runs/demo"}  # make demo, dynaslice demo
    for doc in DOCS:
        text = doc.read_text()
        out |= {top(m) for m in re.findall(r"--(?:out|runs)[= ]+(runs/[\w./$-]+)", text)}
    for _, code in blocks("bash"):
        for cmd in shell_commands(code):
            args = dynaslice_args(cmd)
            if args and args[0] in ("train", "run") and "--out" not in args and len(args) > 1:
                out.add(str(default_run_dir(args[1])))
    return frozenset(out)


def top(path: str) -> str:
    """``runs/X`` of ``runs/X/...``."""
    return "/".join(path.strip("/").split("/")[:2])


@functools.cache
def demo_layout() -> frozenset[str]:
    """Every path the demo writes that the docs may name (directories and files)."""
    _, run = load_run_config("demo", [])
    stage1 = [runs.STAGE1, f"{runs.STAGE1}/{runs.RECALIBRATED}", f"{runs.STAGE1}/{runs.PHASE1}",
              f"{runs.STAGE1}/{runs.CONFIG}", f"{runs.STAGE1}/{runs.FINAL_EVAL}"]  # fmt: skip
    exports = [f"{runs.EXPORT}/{name}" for name in
               ("gated", "exports.json", "largest.pt", "largest.onnx", "smallest.pt", "smallest.onnx")]  # fmt: skip
    gates = [runs.gate_name(t) for t in run.gate_targets]
    files = [runs.ROUTES_RECALIBRATED, runs.EVAL, runs.EXPORT, runs.LATENCY, runs.PIPELINE, runs.DONE,
             "report.md", "report.json", "plots"]  # fmt: skip
    return frozenset(f"runs/demo/{p}" for p in stage1 + exports + gates + files)


def check_run_path(path: str, produced: frozenset[str], layout: frozenset[str]) -> str | None:
    """Why ``path`` (read by a command) would not exist after the documented commands, or None."""
    path = path.rstrip("/")
    if top(path) not in produced:
        return f"{path}: no command of the docs writes {top(path)}"
    if path.startswith("runs/demo/") and path not in layout:
        return f"{path}: the demo writes no such path (it writes {', '.join(sorted(layout))})"
    return None


def parse(args: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(args)
        except SystemExit:
            raise AssertionError(err.getvalue().strip().splitlines()[-1]) from None


def check_dynaslice(args: list[str], produced: frozenset[str], layout: frozenset[str]) -> list[str]:
    """What is wrong with one ``dynaslice`` command line (empty: nothing found)."""
    ns = parse(args)
    problems = []
    if ns.command == "train":
        load_config(ns.config, ns.set, ignore=("run",))
    elif ns.command == "run":
        load_run_config(ns.config, ns.set)
    elif ns.command == "profile" and ns.model not in list_supernets():
        problems.append(f"profile {ns.model}: not a registered supernet")
    outputs = {getattr(ns, "out", None)}
    for word in args:
        if word.startswith("runs/") and word not in outputs:
            problems.append(check_run_path(word, produced, layout))
    return [p for p in problems if p]


def check_other(cmd: list[str]) -> list[str]:
    """``python bench/X.py``, ``pytest tests/X.py`` and ``make X``: the file or target exists."""
    problems = []
    if cmd[0] == "make":
        targets = set(re.findall(r"(?m)^([\w-]+):", (ROOT / "Makefile").read_text()))
        problems += [f"make {t}: no such target" for t in cmd[1:] if t not in targets]
    elif cmd[0] in ("python", "python3"):
        for word in cmd[1:3]:
            if re.fullmatch(r"(bench|tests)/[\w/]+\.py", word) and not (ROOT / word).is_file():
                problems.append(f"{word}: no such file")
        if cmd[1:3] == ["-m", "pytest"]:
            problems += [
                f"{w}: no such file" for w in cmd[3:] if w.startswith("tests/") and not (ROOT / w).is_file()
            ]
    return problems


SHELL = blocks("bash")


def test_the_docs_hold_commands_to_check():
    assert len(SHELL) > 20 and len(blocks("python")) >= 5
    assert sum(len(shell_commands(code)) for _, code in SHELL) > 50


@pytest.mark.parametrize("where, code", SHELL, ids=[w for w, _ in SHELL])
def test_bash_block(where, code):
    produced, layout = produced_run_dirs(), demo_layout()
    problems = []
    for cmd in shell_commands(code):
        args = dynaslice_args(cmd)
        try:
            found = check_dynaslice(args, produced, layout) if args is not None else check_other(cmd)
        except (AssertionError, ValueError, OSError) as e:  # argparse's message, ConfigError, ...
            found = [str(e)]
        problems += [f"{shlex.join(cmd)}\n    -> {p}" for p in found]
    assert not problems, f"{where}:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- python


def _chain(node: ast.AST) -> list[str] | None:
    """``ds.BudgetNet.load`` -> ``["ds", "BudgetNet", "load"]`` (None unless names all the way)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def undefined_names(tree: ast.AST, code: str) -> list[str]:
    """Names a block reads but never binds (imports, assignments, loops, ...), builtins aside.

    A block may name what the reader brings in a comment ``# given: train_dataset, test_images``.
    """
    given = {n.strip() for m in re.findall(r"#\s*given:([\w, ]*)", code) for n in m.split(",")}
    bound = set(dir(builtins)) | given
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return sorted(used - bound)


def check_python(code: str) -> list[str]:
    tree = ast.parse(code)  # a SyntaxError fails the test with its line
    compile(tree, "<block>", "exec")
    aliases: dict[str, object] = {}
    problems = [f"{name}: used but never defined in the block" for name in undefined_names(tree, code)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "dynaslice":
                    aliases[a.asname or a.name.split(".")[0]] = importlib.import_module(
                        a.name if a.asname else "dynaslice"
                    )
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dynaslice":
            module = importlib.import_module(node.module)
            for a in node.names:
                value = getattr(module, a.name, None)
                if value is None:
                    with contextlib.suppress(ImportError):
                        value = importlib.import_module(f"{node.module}.{a.name}")
                if value is None:
                    problems.append(f"from {node.module} import {a.name}: no such name")
                aliases[a.asname or a.name] = value
    produced, layout = produced_run_dirs(), demo_layout()
    for node in ast.walk(tree):
        chain = _chain(node) if isinstance(node, ast.Attribute) else None
        if chain and chain[0] in aliases and aliases[chain[0]] is not None:
            obj = aliases[chain[0]]
            for i, name in enumerate(chain[1:], 1):
                if not hasattr(obj, name):
                    problems.append(f"{'.'.join(chain[: i + 1])}: no such attribute")
                    break
                obj = getattr(obj, name)
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = _chain(node.func) or []
            arg = node.args[0].value
            if not isinstance(arg, str):
                continue
            if func[-1:] == ["create_supernet"] and arg not in list_supernets():
                problems.append(f"create_supernet({arg!r}): not a registered supernet")
            if func[-1:] == ["load_config"]:
                try:
                    resolve_config(arg)
                except ValueError as e:
                    problems.append(str(e))
            if func[-1:] in (["load"], ["load_supernet"]) and arg.startswith("runs/"):
                problems.append(check_run_path(arg, produced, layout))
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith("runs/demo/")
        ):
            if node.value.rstrip("/") != "runs/demo":
                problems.append(check_run_path(node.value, produced, layout))
    return [p for p in problems if p]


PYTHON = blocks("python")


@pytest.mark.parametrize("where, code", PYTHON, ids=[w for w, _ in PYTHON])
def test_python_block(where, code):
    problems = check_python(code)
    assert not problems, f"{where}:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the checker itself


def test_the_checker_finds_the_mistakes_of_issue_33():
    """The README's old Serving block and mistyped commands are caught (the checker checks)."""
    old_serving = (
        "from dynaslice import serve\n"
        'sub = serve.load("runs/quick/recalibrated.safetensors", arch="x0.5")\n'
        'ref = serve.load("runs/demo/gate-t0.3", runtime="eager")\n'
        "serve.lod\n"
    )
    problems = check_python(old_serving)
    assert any("runs/quick" in p for p in problems)
    assert any("gate-t0.3" in p for p in problems)
    assert any("serve.lod" in p for p in problems)
    assert check_python("y, routes = gated.forward_with_routes(x)\n") == [
        "gated: used but never defined in the block",
        "x: used but never defined in the block",
    ]
    assert check_python("# given: x\ny = abs(x)\n") == []
    produced, layout = produced_run_dirs(), demo_layout()
    (cmd,) = shell_commands("dynaslice eval runs/demo/stage1 --archs x0.5 --no-such-flag\n")
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-flag"):
        check_dynaslice(dynaslice_args(cmd), produced, layout)
    (cmd,) = shell_commands("dynaslice train fmnist_quick --set train.no_such_key=1   # a comment\n")
    with pytest.raises(ValueError, match="no_such_key"):
        check_dynaslice(dynaslice_args(cmd), produced, layout)
    cmds = shell_commands(
        'PY="python -m dynaslice.cli train"\nfor s in 3 4; do $PY demo --out runs/x$s; done\n'
    )
    assert [dynaslice_args(c) for c in cmds if dynaslice_args(c)] == [["train", "demo", "--out", "runs/x3"]]
    assert check_other(["make", "dmeo"]) == ["make dmeo: no such target"]
