"""Every figure in README.md and docs/*.md traced to a JSON under bench/out/ (issue 29 item 7).

A reader of a figure should find the file it came from and, beside that file's name in the docs,
the command that wrote it. The docs say where with HTML comments (invisible when rendered). On a
line of its own, a marker applies to the lines below it, up to the next marker or heading:

- ``<!-- source: bench/out/a.json bench/out/b.json -->``: every figure below appears in one of
  these files (rounded as shown);
- ``<!-- untraced: REASON -->``: measured, but no JSON under bench/out records it (REASON says why
  and what would record it); listed, not refused, so that the gap stays visible;
- ``<!-- not-measured: REASON -->``: the numbers are settings, arithmetic on a traced figure shown
  nearby, or facts that no run measures (REASON says which).

Inside a line (at its end; in a table, in its last cell), a ``source`` marker names that line's
own sources instead of the block's (a list item in a list of several sources), and an
``untraced`` or ``not-measured`` marker covers only the figures of that line that the sources do
not hold: a goal, a figure of code that no longer exists, a measurement no JSON kept, beside
traced ones. A line may carry one of each.

A *figure* is a number shown with a decimal point (``90.72``, ``-0.99``, ``0.9``), a percentage
(``96%``, ``90.7 %``) or a time (``417 s``, ``11 min``, ``6.56 ms``), in running text, lists and
tables; fenced code (commands, checked by tests/test_docs_commands.py) and inline code (flags,
file and arch names such as ``x0.5``) are not figures. A figure *appears* in a JSON if some
number in it, scaled as its key allows (``scales``: a fraction shown as a percentage, a time in
seconds as ms or minutes, MACs as MMACs or GMACs), rounds to it at the digits shown; the sign is ignored, as the text says
"by 0.03 points" of a gap recorded as -0.03. A figure with no decimals (``96%``, ``417 s``) is
matched to the nearest unit.

Failures (exit code 1): a figure under no marker, a source that does not exist or is not JSON, a
source that no command in the docs writes (its name, or a pattern such as
``bench/out/pss_seed{1,2,3}.json`` or ``profile_$m.json``, in a code block or inline code), a
figure found in none of its sources, a marker without a reason or a file. Untraced figures are
listed, with their reasons, every time: they are the docs' debt, not an exemption from it.

    python bench/trace_figures.py              # failures, then the untraced figures
    python bench/trace_figures.py --list       # also every traced figure and the key it matched,
                                               # and the figures marked not-measured
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# How a JSON number may be shown, by what its key says it is: a fraction (|x| <= 1) as a
# percentage; a time (a key word s, ms, seconds, time, latency, wall) in s, ms or minutes; a count of
# MACs or parameters (a key word with "macs", "params") in millions or billions. Everything else
# only as stored.
PERCENT_WORDS = ("accuracy", "acc", "top1", "agreement", "pct", "percent", "drop", "gap", "error")
TIME_WORDS = {"s", "ms", "sec", "secs", "seconds", "time", "times", "latency", "wall"}
TIME_SCALES = {"": (1e3, 1e-3), "ms": (1e3,), "s": (1e-3,), "min": (1 / 60,), "%": ()}

MARKER = re.compile(r"^<!--\s*(source|untraced|not-measured):?(.*?)-->\s*$")
LINE_MARKER = re.compile(r"<!--\s*(source|untraced|not-measured):?(.*?)-->")
FENCE = re.compile(r"^\s*```")
HEADING = re.compile(r"^#{1,6}\s")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
# a decimal, a percentage or a time; not inside a word or a version (x0.5, 2.14.1, 224x224)
FIGURE = re.compile(
    r"(?<![\w.])[+-]?(\d+\.\d+|\d+)(?![\w.]*\d)"
    r"(?=(\s?%|\s?(?:ms|min)\b|\ss\b)?)"
)


@dataclass
class Figure:
    line: int
    text: str  # as shown, e.g. "90.72" or "96%"
    value: float
    decimals: int
    unit: str = ""  # "", "%", "ms", "s" or "min"
    exempt: tuple[str, str] | None = None  # a line marker's (kind, reason)


@dataclass
class Block:
    """The figures under one marker (or under none: ``kind`` is None)."""

    doc: Path
    line: int  # of the marker, or of the first figure when there is none
    kind: str | None = None
    arg: str = ""
    figures: list[Figure] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{shown(self.doc)}:{self.line}"


def shown(doc: Path) -> str:
    """A doc's path as the listing names it: relative to the repository when inside it."""
    return str(doc.relative_to(ROOT)) if doc.is_relative_to(ROOT) else str(doc)


def figures_in(line: str, number: int) -> Iterator[Figure]:
    """The figures of one line of prose or table (inline code and link targets removed)."""
    text = LINK_TARGET.sub("]", INLINE_CODE.sub("", line))
    for m in FIGURE.finditer(text):
        digits, unit = m.group(1), m.group(2)
        if "." not in digits and not unit:
            continue  # a count, a size or a setting: 3 seeds, batch 64, 224 px
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        yield Figure(number, m.group(0) + (unit or ""), float(digits), decimals, (unit or "").strip())


def blocks(doc: Path) -> list[Block]:
    """The doc's figures grouped by the marker they stand under."""
    out: list[Block] = []
    current: Block | None = None
    in_code = False
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        if HEADING.match(line):
            current = None
            continue
        marker = MARKER.match(line.strip())
        if marker:
            current = Block(doc, number, marker.group(1), marker.group(2).strip())
            out.append(current)
            continue
        inline = {kind: arg.strip() for kind, arg in LINE_MARKER.findall(INLINE_CODE.sub("", line))}
        target = current
        if "source" in inline:  # this line's own sources, instead of the block's
            target = Block(doc, number, "source", inline.pop("source"))
            out.append(target)
        for fig in figures_in(LINE_MARKER.sub("", line), number):
            if inline:
                fig.exempt = next(iter(inline.items()))
            if target is None:
                target = current = Block(doc, number)
                out.append(current)
            target.figures.append(fig)
    return out


MAX_QUOTED_LIST = 12  # a longer list of numbers is raw samples, not figures
OUT_NAME = re.compile(r"bench/out/[\w{},$*./-]+?\.json")  # a variant's folder too: bench/out/v/x.json


def written_by_commands(docs: list[Path]) -> re.Pattern[str]:
    """The bench/out files the docs' commands name (code blocks and inline code), as one pattern:
    ``{a,b}`` alternatives and shell variables (``$seed``, ``${v}``, a seed ``S``) match any part."""
    names = set()
    for doc in docs:
        for code in re.findall(r"```.*?```|`[^`]+`", doc.read_text(), re.S):
            names.update(OUT_NAME.findall(code))
    patterns = []
    for name in sorted(names):
        p = re.escape(name)
        p = re.sub(r"\\\{([^}]*)\\\}", lambda m: "(" + m.group(1).replace(",", "|") + ")", p)
        p = re.sub(r"\\\$(?:\\\{)?\w+(?:\\\})?|(?<=seed)S", r"[\\w.-]+", p)
        patterns.append(p)
    return re.compile("|".join(patterns) or "(?!)")


def numbers(data: object, key: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a JSON document with the key path that leads to it; a list of numbers (per
    seed, as a rule) also gives its mean and standard error, as the docs quote them."""
    if isinstance(data, bool):
        return
    if isinstance(data, int | float):
        if math.isfinite(data):
            yield key, float(data)
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(data, list):
        values = [v for v in data if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(values) > MAX_QUOTED_LIST and len(values) == len(data):
            return  # raw samples (per-round times): never quoted one by one, and they would match anything
        for i, v in enumerate(data):
            yield from numbers(v, f"{key}[{i}]")
        if len(values) > 1 and len(values) == len(data):  # per-seed values: the docs quote mean +- s.e.
            yield f"{key}:mean", statistics.fmean(values)
            yield f"{key}:se", statistics.stdev(values) / math.sqrt(len(values))


def scales(fig: Figure, key: str, value: float) -> tuple[float, ...]:
    """The factors by which the number at ``key`` may be shown as ``fig`` (see ``TIME_WORDS``)."""
    if not fig.unit and len(fig.text.strip("+-").replace(".", "").lstrip("0")) < 2:
        return (1.0,)  # "0.1" scaled would match nearly any number: shown as stored, or not at all
    words = set(re.split(r"[^a-z0-9]+", key.lower()))
    # a percentage is a fraction x 100, or a number its key calls a percentage (96 % is not 96 ms)
    out = [1.0] if fig.unit != "%" or any(w.startswith(PERCENT_WORDS) for w in words) else []
    if abs(value) <= 1 and fig.unit in ("", "%"):
        out.append(100.0)
    if words & TIME_WORDS or any(w.endswith(("seconds", "ms")) for w in words):
        out += TIME_SCALES[fig.unit]
    if fig.unit == "" and any("macs" in w or "params" in w for w in words):
        out += (1e-6, 1e-9)
    return tuple(out)


def matches(fig: Figure, value: float, key: str = "") -> bool:
    """Whether the number ``value`` at ``key`` (scaled as its key allows) rounds to the figure as shown."""
    half = 0.5 * 10.0**-fig.decimals + 1e-9
    return any(abs(abs(value * s) - fig.value) <= half for s in scales(fig, key, value))


@dataclass
class Trace:
    failures: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)
    traced: list[str] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)

    def exempt(self, where: str, fig: Figure, kind: str, reason: str) -> None:
        """A figure a marker says no JSON holds: listed with its reason, or a failure without one."""
        if not reason:
            self.failures.append(f"{where}: {kind} marker without a reason")
        rows = self.untraced if kind == "untraced" else self.not_measured
        rows.append(f"{where}: {fig.text} -- {reason}")


def load_sources(
    block: Block, root: Path, trace: Trace, commands: re.Pattern[str]
) -> list[tuple[str, list[tuple[str, float]]]]:
    sources = []
    for name in block.arg.split():
        path = root / name
        if not name.startswith("bench/out/") or not name.endswith(".json"):
            trace.failures.append(f"{block.where}: source {name!r} is not a bench/out/*.json file")
            continue
        if not commands.fullmatch(name):
            trace.failures.append(f"{block.where}: source {name}: no command in the docs writes it")
        try:
            sources.append((name, list(numbers(json.loads(path.read_text())))))
        except (OSError, ValueError) as e:
            trace.failures.append(f"{block.where}: source {name} cannot be read: {e}")
    if not block.arg.split():
        trace.failures.append(f"{block.where}: a source marker names no file")
    return sources


def check(docs: list[Path] = DOCS, root: Path = ROOT) -> Trace:
    """Every figure of ``docs`` against its markers: failures, untraced figures, matches."""
    trace = Trace()
    commands = written_by_commands(docs)
    for doc in docs:
        for block in blocks(doc):
            sources = load_sources(block, root, trace, commands) if block.kind == "source" else []
            for fig in block.figures:
                where = f"{shown(doc)}:{fig.line}"
                hit = next(((n, k) for n, values in sources for k, v in values if matches(fig, v, k)), None)
                if hit:
                    trace.traced.append(f"{where}: {fig.text} <- {hit[0]} {hit[1]}")
                elif fig.exempt:
                    trace.exempt(where, fig, *fig.exempt)
                elif block.kind in ("untraced", "not-measured"):
                    trace.exempt(where, fig, block.kind, block.arg)
                elif block.kind is None:
                    trace.failures.append(f"{where}: {fig.text} is under no source marker")
                else:
                    trace.failures.append(
                        f"{where}: {fig.text} is in none of the sources at line {block.line}"
                    )
    return trace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("docs", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md)")
    ap.add_argument("--list", action="store_true", help="also print every traced figure and its JSON key")
    args = ap.parse_args(argv)
    trace = check([p.resolve() for p in args.docs] or DOCS)
    if args.list:
        print("\n".join(trace.traced))
        print(f"\nnot measured: {len(trace.not_measured)}\n" + "\n".join(trace.not_measured))
    for title, rows in (("untraced (measured, no JSON yet)", trace.untraced), ("FAILURES", trace.failures)):
        if rows:
            print(f"\n{title}: {len(rows)}\n" + "\n".join(rows))
    print(
        f"\n{len(trace.traced)} figures traced, {len(trace.untraced)} untraced, "
        f"{len(trace.not_measured)} not measured, {len(trace.failures)} failures"
    )
    return 1 if trace.failures else 0


if __name__ == "__main__":
    sys.exit(main())
