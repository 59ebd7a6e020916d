"""Generated reports never overwrite what git tracks: the report stage writes under the runs folder, `publish`
copies chosen finished reports into the tracked folder; rebuilding or publishing one experiment keeps every other
experiment's summary rows and removes the experiment's own figures of an earlier build."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from replication.report import schema as S
from replication.report.__main__ import main as report_main
from replication.report.build import build_report, experiment_files, publish
from test_report import PAPER_DIR, REPO, _write, comparable_run, recon_run, smoke_run


def _experiments(reports: Path) -> dict[str, set[str]]:
    """Experiments each summary file lists."""
    flat = json.loads((reports / "metrics_flat.json").read_text())
    nested = json.loads((reports / "metrics_summary.json").read_text())["experiments"]
    table = pd.read_csv(reports / "summary.csv")
    md = (reports / "summary.md").read_text()
    return {"flat": set(flat), "json": set(nested), "csv": set(table["experiment"]),
            "md": {name for name in ("smoke", "smoke_cin", "churches_full", "ae_kl_f8") if f"ours: {name}**" in md}}


def _smoke_cin_run() -> dict:
    run = smoke_run()
    run["experiment"] = "smoke_cin"  # its file names start with "smoke_": rebuilding "smoke" must leave them alone
    return run


def _no_curves(run: dict) -> dict:
    """A run without figures of its own (keeps these tests fast: each figure is a matplotlib render)."""
    return dict(run, curves={})


def test_rebuilding_one_experiment_keeps_the_others_and_drops_its_stale_files(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "reports"
    _write(runs, "smoke", S.METRICS_FILE, smoke_run())
    _write(runs, "smoke_cin", S.METRICS_FILE, _smoke_cin_run())
    _write(runs, "churches_full", S.METRICS_FILE, _no_curves(comparable_run()))
    build_report(runs, out, PAPER_DIR)
    assert (out / "figures" / "smoke_fid_vs_throughput.png").is_file()
    cin_files = {p: p.read_bytes() for p in (out / "figures").glob("smoke_cin_*")}
    assert cin_files

    # churches_full's run folder is gone; smoke is rerun without its Fig. 7 curve
    (runs / "churches_full" / S.METRICS_FILE).unlink()
    (runs / "churches_full").rmdir()
    rerun = smoke_run()
    rerun["curves"] = {}
    _write(runs, "smoke", S.METRICS_FILE, rerun)
    build_report(runs, out, PAPER_DIR, experiments=["smoke"])

    for where, names in _experiments(out).items():
        assert names == {"smoke", "smoke_cin", "churches_full"}, where
    assert not (out / "figures" / "smoke_fid_vs_throughput.png").exists(), "a stale figure of the rebuilt experiment"
    assert not (out / "plots" / "smoke_fid_vs_steps.csv").exists()
    assert "smoke_fid_vs" not in (out / "smoke.md").read_text()
    assert {p: p.read_bytes() for p in (out / "figures").glob("smoke_cin_*")} == cin_files
    assert (out / "churches_full.md").is_file() and (out / "metrics" / "churches_full" / S.METRICS_FILE).is_file()


def test_publish_copies_chosen_reports_and_keeps_earlier_ones(tmp_path):
    runs, generated, published = tmp_path / "runs", tmp_path / "runs" / "reports", tmp_path / "tracked"
    _write(runs, "ae_kl_f8", S.RECON_METRICS_FILE, recon_run())
    build_report(runs, generated, PAPER_DIR)
    publish(generated, published, PAPER_DIR, ["ae_kl_f8"])
    _write(runs, "smoke", S.METRICS_FILE, smoke_run())
    _write(runs, "churches_full", S.METRICS_FILE, _no_curves(comparable_run()))
    build_report(runs, generated, PAPER_DIR, experiments=["smoke", "churches_full"])
    (published / "figures" / "smoke_train_loss.png").parent.mkdir(parents=True, exist_ok=True)
    (published / "figures" / "smoke_train_loss.png").write_bytes(b"a figure smoke's new report does not have")

    result = publish(generated, published, PAPER_DIR, ["smoke"])

    assert result["published"] == ["smoke"]
    for rel in experiment_files("smoke"):
        src, dst = generated / rel, published / rel
        assert dst.is_file() == src.is_file(), rel
        if src.is_file():
            assert dst.read_bytes() == src.read_bytes(), rel
    assert (published / "figures" / "smoke_fid_vs_throughput.png").is_file()
    assert not (published / "figures" / "smoke_train_loss.png").exists()
    assert not (published / "churches_full.md").exists(), "only the chosen experiment is published"
    for where, names in _experiments(published).items():
        assert names == {"smoke", "ae_kl_f8"}, where
    assert (published / "figures" / "recon_vs_f.png").is_file() and (published / "figures" / "fid_vs_ddim_steps.png").is_file()


def test_publish_refuses_an_experiment_without_a_finished_report(tmp_path, capsys):
    runs, generated = tmp_path / "runs", tmp_path / "generated"
    _write(runs, "smoke", S.METRICS_FILE, _no_curves(smoke_run()))
    build_report(runs, generated, PAPER_DIR)
    with pytest.raises(FileNotFoundError, match=r"no finished report of 'ghost' in .*generated \(reported there: smoke\)"):
        publish(generated, tmp_path / "tracked", PAPER_DIR, ["ghost"])
    assert report_main(["publish", "--from", str(generated), "--to", str(tmp_path / "tracked"), "--paper", str(PAPER_DIR),
                        "--experiments", "ghost"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no finished report of 'ghost'") and err.count("\n") == 1
    assert not (tmp_path / "tracked").exists()


def test_publish_command_line(tmp_path):
    runs, generated, published = tmp_path / "runs", tmp_path / "runs" / "reports", tmp_path / "tracked"
    _write(runs, "smoke", S.METRICS_FILE, _no_curves(smoke_run()))
    build_report(runs, generated, PAPER_DIR)
    proc = subprocess.run([sys.executable, "-m", "replication.report", "publish", "--from", str(generated), "--to",
                           str(published), "--paper", str(PAPER_DIR)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["published"] == ["smoke"]
    assert (published / "smoke.md").read_text() == (generated / "smoke.md").read_text()


def test_report_stage_writes_under_the_runs_folder_by_default():
    from replication.stages.entry import compose

    cfg = compose(["experiment=smoke", "runs_root=/somewhere/runs"])
    assert cfg.reports_dir == "/somewhere/runs/reports"
    default = compose(["experiment=smoke"])
    tracked = (REPO / "reports").resolve()
    assert (REPO / default.reports_dir).resolve() != tracked and Path(default.reports_dir).parts[0] == default.runs_root
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{default.reports_dir}/smoke.md"], cwd=REPO)
    assert ignored.returncode == 0, f"{default.reports_dir} is not ignored by git"
