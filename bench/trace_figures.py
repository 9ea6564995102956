"""Every figure in README.md and docs/*.md traced to a JSON under bench/out/ (issue 29 item 7).

A reader of a figure should find the file it came from and, beside that file's name in the docs,
the command that wrote it. The docs say where with HTML comments (invisible when rendered), each
on a line of its own; one applies to the blocks below it, up to the next marker or heading:

- ``<!-- source: bench/out/a.json bench/out/b.json -->``: every figure below appears in one of
  these files (rounded as shown);
- ``<!-- untraced: REASON -->``: measured, but no JSON under bench/out records it (REASON says why
  and what would record it); listed, not refused, so that the gap stays visible;
- ``<!-- not-measured: REASON -->``: the numbers are settings, arithmetic on a traced figure shown
  nearby, or facts that no run measures (REASON says which).

A *figure* is a number shown with a decimal point (``90.72``, ``-0.99``, ``0.9``), a percentage
(``96%``, ``90.7 %``) or a time (``417 s``, ``11 min``, ``6.56 ms``), in running text, lists and
tables; fenced code (commands, checked by tests/test_docs_commands.py) and inline code (flags,
file and arch names such as ``x0.5``) are not figures. A figure *appears* in a JSON if some
number in it, scaled by one of ``SCALES`` (a fraction shown as a percentage, seconds as ms or
minutes, MACs as MMACs), rounds to it at the digits shown; the sign is ignored, as the text says
"by 0.03 points" of a gap recorded as -0.03. A figure with no decimals (``96%``, ``417 s``) is
matched to the nearest unit.

Failures (exit code 1): a block with figures under no marker, a source that does not exist or is
not JSON, a figure found in none of its block's sources, a marker without a reason or a file.

    python bench/trace_figures.py              # failures, then the untraced blocks
    python bench/trace_figures.py --list       # also every traced figure and the key it matched
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# fraction -> %, s -> ms, ms -> s, MACs -> MMACs, s -> min
SCALES = (1.0, 100.0, 1e3, 1e-3, 1e-6, 1 / 60)

MARKER = re.compile(r"^<!--\s*(source|untraced|not-measured):?(.*?)-->\s*$")
FENCE = re.compile(r"^\s*```")
HEADING = re.compile(r"^#{1,6}\s")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
# a decimal, a percentage or a time; not inside a word or a version (x0.5, 2.14.1, 224x224)
FIGURE = re.compile(
    r"(?<![\w.])[+-]?(\d+\.\d+|\d+)(?![\w.]*\d)"
    r"(?=(\s?%|\s?(?:ms|s|min)\b)?)"
)


@dataclass
class Figure:
    line: int
    text: str  # as shown, e.g. "90.72" or "96%"
    value: float
    decimals: int


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
        yield Figure(number, m.group(0) + (unit or ""), float(digits), decimals)


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
        for fig in figures_in(line, number):
            if current is None:
                current = Block(doc, number)
                out.append(current)
            current.figures.append(fig)
    return out


def numbers(data: object, key: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a JSON document with the key path that leads to it."""
    if isinstance(data, bool):
        return
    if isinstance(data, int | float):
        if math.isfinite(data):
            yield key, float(data)
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from numbers(v, f"{key}[{i}]")


def matches(fig: Figure, value: float) -> bool:
    """Whether ``value`` (scaled) rounds to the figure as shown."""
    half = 0.5 * 10.0**-fig.decimals + 1e-9
    return any(abs(abs(value * s) - fig.value) <= half for s in SCALES)


@dataclass
class Trace:
    failures: list[str] = field(default_factory=list)
    untraced: list[str] = field(default_factory=list)
    traced: list[str] = field(default_factory=list)


def load_sources(block: Block, root: Path, trace: Trace) -> list[tuple[str, list[tuple[str, float]]]]:
    sources = []
    for name in block.arg.split():
        path = root / name
        if not name.startswith("bench/out/") or not name.endswith(".json"):
            trace.failures.append(f"{block.where}: source {name!r} is not a bench/out/*.json file")
            continue
        try:
            sources.append((name, list(numbers(json.loads(path.read_text())))))
        except (OSError, ValueError) as e:
            trace.failures.append(f"{block.where}: source {name} cannot be read: {e}")
    if not block.arg.split():
        trace.failures.append(f"{block.where}: a source marker names no file")
    return sources


def check(docs: list[Path] = DOCS, root: Path = ROOT) -> Trace:
    """Every figure of ``docs`` against its marker: the failures, the untraced blocks, the matches."""
    trace = Trace()
    for doc in docs:
        for block in blocks(doc):
            listed = ", ".join(f.text for f in block.figures)
            if block.kind is None:
                lines = sorted({f.line for f in block.figures})
                trace.failures.append(
                    f"{block.where}: figures under no source marker (lines {lines}): {listed}"
                )
            elif block.kind != "source":
                if not block.arg:
                    trace.failures.append(f"{block.where}: {block.kind} marker without a reason")
                elif block.kind == "untraced" and block.figures:
                    trace.untraced.append(f"{block.where}: {block.arg} [{listed}]")
            else:
                sources = load_sources(block, root, trace)
                for fig in block.figures:
                    hit = next(
                        ((name, key) for name, values in sources for key, v in values if matches(fig, v)),
                        None,
                    )
                    if hit is None and sources:
                        trace.failures.append(
                            f"{shown(doc)}:{fig.line}: {fig.text} is in none of the sources at line {block.line}"
                        )
                    elif hit:
                        trace.traced.append(f"{shown(doc)}:{fig.line}: {fig.text} <- {hit[0]} {hit[1]}")
    return trace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("docs", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md)")
    ap.add_argument("--list", action="store_true", help="also print every traced figure and its JSON key")
    args = ap.parse_args(argv)
    trace = check([p.resolve() for p in args.docs] or DOCS)
    if args.list:
        print("\n".join(trace.traced))
    for title, rows in (("untraced (measured, no JSON yet)", trace.untraced), ("FAILURES", trace.failures)):
        if rows:
            print(f"\n{title}: {len(rows)}\n" + "\n".join(rows))
    print(
        f"\n{len(trace.traced)} figures traced, {len(trace.untraced)} blocks untraced, {len(trace.failures)} failures"
    )
    return 1 if trace.failures else 0


if __name__ == "__main__":
    sys.exit(main())
