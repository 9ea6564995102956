"""Every figure in README.md and docs/ is traced to a JSON under bench/out/ (issue 29 item 7).

The check is ``bench/trace_figures.py`` (its docstring says what a figure and a marker are); here
it runs over the real docs -- nothing trains or times, it reads Markdown and JSON -- and over
small made-up docs, to pin down what it refuses.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("trace_figures", ROOT / "bench" / "trace_figures.py")
tf = sys.modules["trace_figures"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(tf)


def test_every_figure_of_the_docs_is_traced_or_marked():
    trace = tf.check()
    assert not trace.failures, "untraceable figures (see bench/trace_figures.py):\n" + "\n".join(
        trace.failures
    )
    assert len(trace.traced) > 1000  # the docs' tables are checked, not skipped


@pytest.fixture
def repo(tmp_path: Path):
    """A repository with bench/out/r.json; returns a function that checks a doc's text."""
    out = tmp_path / "bench" / "out"
    out.mkdir(parents=True)
    (out / "r.json").write_text(
        json.dumps(
            {"acc": 90.7249, "share": 0.8712, "macs": 28573328, "secs": 417.4, "seeds": [90.1, 90.5, 90.3]}
        )
    )

    def check(
        text: str, command: str = "```bash\npython bench/x.py --out bench/out/r.json\n```\n"
    ) -> tf.Trace:
        doc = tmp_path / "doc.md"
        doc.write_text(text + "\n" + command)  # the command that writes r.json, after the text
        return tf.check([doc], root=tmp_path)

    return check


SOURCE = "<!-- source: bench/out/r.json -->\n"


def test_figures_match_their_source_as_rounded_and_scaled(repo):
    trace = repo(SOURCE + "Top-1 90.72 (90.7 %), 87% of images, 28.57 MMACs, 417 s; mean 90.30 +- 0.12.\n")
    assert not trace.failures
    assert len(trace.traced) == 7


def test_a_figure_its_source_does_not_hold_fails(repo):
    trace = repo(SOURCE + "Top-1 90.73.\n")
    assert len(trace.failures) == 1 and "90.73 is in none of the sources" in trace.failures[0]


def test_a_figure_under_no_marker_fails_and_a_heading_ends_a_marker(repo):
    trace = repo(SOURCE + "Top-1 90.72.\n\n## Next\n\nTop-1 90.72.\n")
    assert len(trace.traced) == 1
    assert len(trace.failures) == 1 and trace.failures[0].endswith(
        "doc.md:6: 90.72 is under no source marker"
    )


def test_code_counts_and_names_are_not_figures(repo):
    trace = repo(
        "```bash\ndynaslice train --set optim.lr=0.05\n```\n\n`x0.5`, 3 seeds, batch 64, torch 2.14.1, 224x224.\n"
    )
    assert not trace.failures and not trace.traced


def test_a_source_no_command_in_the_docs_writes_fails(repo):
    trace = repo(SOURCE + "Top-1 90.72.\n", command="")
    assert trace.traced and len(trace.failures) == 1
    assert "bench/out/r.json: no command in the docs writes it" in trace.failures[0]
    looped = "```bash\nfor s in r q; do python bench/x.py --out bench/out/$s.json; done\n```\n"
    assert not repo(SOURCE + "Top-1 90.72.\n", command=looped).failures


def test_a_missing_source_fails(repo):
    trace = repo("<!-- source: bench/out/nope.json -->\nTop-1 90.72.\n")
    assert any("cannot be read" in f for f in trace.failures)


def test_untraced_and_not_measured_need_a_reason_and_are_listed(repo):
    trace = repo("<!-- untraced: from a run log -->\nTop-1 91.11.\n\n<!-- not-measured -->\nlr 0.05.\n")
    assert len(trace.untraced) == 1 and trace.untraced[0].endswith("doc.md:2: 91.11 -- from a run log")
    assert len(trace.failures) == 1 and trace.failures[0].endswith(
        "doc.md:5: not-measured marker without a reason"
    )


def test_a_line_marker_covers_only_its_line(repo):
    trace = repo(SOURCE + "Goal 93.5 %, got 90.72. <!-- not-measured: the goal -->\nTop-1 91.11.\n")
    assert len(trace.traced) == 1 and trace.not_measured[0].endswith("doc.md:2: 93.5 % -- the goal")
    assert len(trace.failures) == 1 and "91.11" in trace.failures[0]


def test_the_script_exits_1_on_a_failure(tmp_path: Path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("Top-1 90.72.\n")
    assert tf.main([str(doc)]) == 1
    assert "under no source marker" in capsys.readouterr().out


def run_record_demo(*args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "bench" / "record_demo.py"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_record_demo_keeps_the_report_with_its_machine_and_times(tmp_path: Path):
    run = tmp_path / "demo"
    run.mkdir()
    report = {
        "supernet": [{"name": "x1", "accuracy": 90.72}],
        "step_seconds": {"stage1": 417.0, "eval": 82.0},
    }
    (run / "report.json").write_text(json.dumps(report))
    proc = run_record_demo(
        str(run), "--wall-seconds", "688", "--setup-seconds", "77", "--out", str(tmp_path / "d.json")
    )
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((tmp_path / "d.json").read_text())
    assert rec["report"] == report
    assert (rec["wall_seconds"], rec["setup_seconds"], rec["run_seconds"]) == (688, 77, 499)
    assert rec["cpu"]["cores"] >= 1 and rec["environment"]["torch"]
    assert "this machine" in rec["deterministic"]


def test_record_demo_refuses_a_run_without_a_report_in_one_line(tmp_path: Path):
    proc = run_record_demo(str(tmp_path), "--out", str(tmp_path / "d.json"))
    assert proc.returncode != 0 and "not a finished demo run" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "d.json").exists()


def test_a_line_may_name_its_own_sources(repo, tmp_path: Path):
    (tmp_path / "bench" / "out" / "q.json").write_text(json.dumps({"acc": 50.5}))
    writes_q = (
        "```bash\npython bench/x.py --out bench/out/r.json\npython bench/y.py --out bench/out/q.json\n```\n"
    )
    text = SOURCE + "- 90.72 from r\n- 50.5 from q <!-- source: bench/out/q.json -->\n- 50.5 again\n"
    trace = repo(text, command=writes_q)
    assert len(trace.traced) == 2 and len(trace.failures) == 1  # the block's source is r.json again
    assert "doc.md:4: 50.5 is in none of the sources" in trace.failures[0]


def test_a_file_in_a_folder_of_bench_out_is_written_by_the_command_naming_it(tmp_path):
    doc = tmp_path / "R.md"
    doc.write_text("```bash\npython bench/b.py --out-dir bench/out/v   # -> bench/out/v/x.json\n```\n")
    assert tf.written_by_commands([doc]).fullmatch("bench/out/v/x.json")
