"""What the CLI prints: tables that read at 80 columns, and stdout that pipes (--json, bare YAML, the model path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from rich.console import Console

from preserve_core.bench_table import render_summary
from preserve_core.compare import render_table as compare_table
from preserve_core.recipe import load_recipe
from preserve_core.report import Report, TaskComparison, render_table
from tests.conftest import reverse_examples, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def rendered(renderable, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text().splitlines()


def assert_fits(lines: list[str], width: int = 80) -> None:
    assert not [line for line in lines if "…" in line], "\n".join(lines)
    assert max(len(line.rstrip()) for line in lines) <= width, "\n".join(lines)


def comparison(suite, name, base, tuned, se, cached=False, regressed=False) -> TaskComparison:
    points = 100 * (tuned - base)
    return TaskComparison(
        suite=suite, name=name, kind="exact_match", metric="exact_match", unit="fraction", higher_is_better=True,
        base=base, tuned=tuned, delta=tuned - base, stderr_delta=se, points=points, stderr_points=100 * se,
        retention=tuned / base if base else None, regressed=regressed, base_cached=cached, n=240,
    )  # fmt: skip


def demo_report() -> Report:
    """The shape of `make demo`'s report: one new task, five kept skills (a long name too), cached bases."""
    tasks = [comparison("target", "shift", 0.004, 0.908, 0.019)]
    tasks += [comparison("preserve", n, 1.0, t, 0.03, cached=True, regressed=t < 0.5)
              for n, t in [("reverse", 0.412), ("sort", 0.95), ("recall", 0.2), ("cycle", 0.6), ("count", 0.9)]]  # fmt: skip
    tasks.append(comparison("preserve", "arc_challenge_and_hellaswag_via_lm_eval", 0.45, 0.44, 0.01))
    return Report("/home/user/projects/ppft/recipes/lab_fora.yaml", "lab:tiny", "/tmp/run/final", "peft adapter",
                  "abc", tasks, fail_on_regression=5.0)  # fmt: skip


def test_eval_report_reads_at_80_columns_and_is_detailed_when_wide():
    narrow = rendered(render_table(demo_report(), 80), 80)
    assert_fits(narrow)
    text = "\n".join(narrow)
    assert "REGRESSED" in text and "+90.4 ±1.9" in text and "100.0%*" in text and "from the cache" in text
    wide = "\n".join(rendered(render_table(demo_report(), 160), 160))
    assert "metric" in wide and "(cached)" in wide and "/home/user/projects/ppft/recipes/lab_fora.yaml" in wide


def bench_row(task, method, lr, new, kept, pareto=False) -> dict:
    pct = lambda p: {"score": p, "stderr": 0.02, "n": 240}  # noqa: E731
    return {"task": task, "method": method, "lr": lr, "new_task": pct(new), "preserve_mean": pct(kept),
            "preserve": {"reverse": pct(kept), "sort": pct(kept)}, "kl_to_base": 0.1234, "pareto": pareto,
            "mean_retention": kept, "run": f"runs/{method}"}  # fmt: skip


def test_compare_and_bench_tables_read_at_80_columns():
    rows = [bench_row("shift", m, lr, 0.9, 0.5, pareto=i % 2 == 0) for i, (m, lr) in
            enumerate([("fora_full_rank_energy_0.999", 1e-3), ("folora", 5e-3), ("kl", 1e-2), ("full", 3e-4)])]  # fmt: skip
    for table in (compare_table(rows, 80), render_summary(rows, 80)):
        assert_fits(rendered(table, 80))
    assert "reverse" in "\n".join(rendered(compare_table(rows, 160), 160))  # per-skill columns when wide
    assert "KL" in "\n".join(rendered(render_summary(rows, 160), 160))


def test_lab_card_reads_at_80_columns(tmp_path):
    from cli.lab import print_card
    from preserve_core.lab.skills import NEW_SKILLS, PRETRAIN_SKILLS, SKILLS

    card = {"size": "tiny", "seed": 0, "parameters": 812_416, "pretrain_seconds": 201.3, "data": str(tmp_path / "d"),
            "pretrain_skills": PRETRAIN_SKILLS, "new_skills": NEW_SKILLS, "accuracy": dict.fromkeys(SKILLS, 1.0),
            "skills": {n: {"tag": s.tag} for n, s in SKILLS.items()}}  # fmt: skip
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    print_card(card, tmp_path / "build", True, console)
    lines = console.export_text().splitlines()
    table = [line for line in lines if str(tmp_path) not in line]  # the paths print whole, for copying
    assert_fits(table)
    assert f"model: {tmp_path / 'build' / 'model'}" in lines


def ppft(*args, cwd=REPO) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, stdout piped (not a terminal), as in `ppft ... | jq` or `M=$(ppft ...)`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_stdout_pipes_validate_train_eval_compare(write_recipe, tmp_path, tiny_task_file):
    """Subprocesses for the shell forms (`> resolved.yaml`, `M=$(ppft train ...)`); the --json outputs
    through typer's runner, whose ``stdout`` holds stdout alone (tables and messages go to stderr)."""
    from typer.testing import CliRunner

    from cli.main import app

    held_out = write_jsonl(tmp_path / "held.jsonl", reverse_examples(8, seed=7))
    eval_section = {
        "batch_size": 8,
        "target": [{"name": "rev", "kind": "exact_match", "data": str(held_out), "max_new_tokens": 6}],
        "preserve": [{"name": "keep", "kind": "exact_match", "data": str(tiny_task_file), "max_new_tokens": 6, "limit": 8}],
    }
    path = write_recipe("pipe", eval=eval_section)
    expected = load_recipe(path).resolved()

    resolved = ppft("validate", path).stdout
    assert yaml.safe_load(resolved) == expected
    assert all(line == line.rstrip() for line in resolved.splitlines()), "no padding"
    assert "\x1b[" not in resolved, "no colour codes"

    trained = ppft("train", path)  # progress bar on: it must go to stderr
    final = Path(trained.stdout.splitlines()[-1])
    assert final == load_recipe(path).run_dir() / "final" and (final / "adapter_config.json").exists()
    assert trained.stdout.strip() == str(final), "stdout is the model path alone"

    def stdout_json(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert stdout_json("validate", path, "--json") == json.loads(json.dumps(expected))
    report = stdout_json("eval", path, "--json")
    on_disk = json.loads((final.parent / "eval" / "report.json").read_text())
    assert report["retention"] == on_disk["summary"]["mean_retention"] and report["passed"] is True
    assert [t["name"] for t in report["tasks"]] == ["rev", "keep"] and "samples" not in report
    compared = stdout_json("compare", final.parent, "--out", tmp_path / "cmp", "--json")
    assert [r["method"] for r in compared["runs"]] == ["lora"]
    assert compared["runs"][0]["new_task"]["score"] == on_disk["tasks"][0]["tuned"]


def test_brackets_in_messages_labels_and_paths_print_as_written(tmp_path, monkeypatch):
    """Console markup must not eat user text: before, an error whose message held ``[/...]`` (gloo's
    'Connection closed by peer [/path/pair.cc:553]') crashed the error printer, and a ``[tag]`` in a
    path or a method label vanished from the output."""
    import typer
    from rich.console import Console

    from cli import common
    from preserve_core.errors import RecipeError

    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    monkeypatch.setattr(common, "err_console", console)

    def fails(error):
        def run():
            raise error

        return run

    for error, code in [(RuntimeError("Connection closed by peer [/gloo/pair.cc:553]"), 1),
                        (RecipeError("data.train: /data/[train]/x.jsonl does not exist"), 2)]:  # fmt: skip
        try:
            common.guarded(fails(error), debug=False)
        except typer.Exit as exit_:
            assert exit_.exit_code == code
    text = console.export_text()
    assert "Connection closed by peer [/gloo/pair.cc:553]" in text
    assert "/data/[train]/x.jsonl does not exist" in text

    rows = [{"task": "shift", "method": "lora[r8]", "lr": 1e-3, "new_task": {"score": 0.5, "stderr": 0.01},
             "preserve_mean": {"score": 0.9, "stderr": 0.01}, "pareto": True}]  # fmt: skip
    assert any("lora[r8]" in line for line in rendered(render_summary(rows, 80), 80))


def test_a_collective_timeout_names_the_setting_and_other_errors_get_no_hint(monkeypatch):
    """gloo's timeout (its words, as test_ddp_timeout sees them) and NCCL's watchdog get a hint naming
    training.distributed.timeout_s; an unrelated RuntimeError prints as before, with no hint."""
    import typer
    from rich.console import Console

    from cli import common

    messages = {
        "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 2000ms for recv operation to complete": True,
        "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE) ran for 600000 ms": True,
        "mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)": False,
    }
    for message, hinted in messages.items():
        console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        monkeypatch.setattr(common, "err_console", console)

        def run(message=message):
            raise RuntimeError(message)

        try:
            common.guarded(run, debug=False)
        except typer.Exit as exit_:
            assert exit_.exit_code == 1
        text = console.export_text()
        assert message in text
        assert ("training.distributed.timeout_s" in text) is hinted, message
        assert ("hint:" in text) is hinted
