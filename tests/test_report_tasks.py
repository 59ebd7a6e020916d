"""The report of super-resolution and inpainting runs: each metric of the paper's row (Tab. 5, 6, 7, 11) beside ours
with the verdict, the paper's other rows as context, inpainting's per-bin table, and the example figure, each
checked against its source (metrics.json, results.csv, examples.npz). The runs are written here the way the evaluate
stage writes them."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from replication.report import schema as S
from replication.report.build import (FIG_TASK_EXAMPLES, build_report, experiment_files, figure_name, publish,
                                      task_example_columns)
from replication.report.compare import compare_ldm
from replication.report.figures import NOT_COMPARABLE_TAG, task_examples_figure
from replication.report.paper import load_paper_results
from replication.report.tables import MISSING, VERDICT_TEXT, fmt, fmt_signed
from replication.report.verdict import Verdict
from replication.utils.paths import PathEscapeError

REPO = Path(__file__).resolve().parents[1]
PAPER_DIR = REPO / "reports" / "paper"
EXAMPLES = "evaluate/examples.npz"
N_EXAMPLES, SIDE = 3, 12

SR_KEY = {"table": "5", "dataset": "ImageNet-Val", "method": "LDM-4 (100 steps)"}
INPAINT_KEY = {"table": "7", "dataset": "Places (30k test crops)", "method": "LDM-4 (w/ attn)"}


def _base(name: str, paper: dict, comparable: bool) -> dict:
    protocol = {"num_samples": 64, "sampler": "ddim", "steps": 100, "eta": 1.0, "reference_set": "val"}
    return {"schema_version": 1, "experiment": name, "comparable": comparable,
            "not_comparable_reasons": [] if comparable else ["smoke experiment: tiny built-in data"],
            "paper": paper, "protocol": protocol, "paper_protocol": dict(protocol)}


def sr_run(name: str = "sr_full") -> dict:
    """A comparable super-resolution run: FID vs val and IS, PSNR inside the band, FID vs train and SSIM outside."""
    run = _base(name, SR_KEY, True)
    run["metrics"] = {
        "FID": {"value": 2.9, "ci95": [2.85, 2.95], "n_samples": 64},
        "FID_trainsplit_ref": {"value": 6.0, "n_samples": 64, "reference": "train split"},
        "FID_valsplit_ref": {"value": 2.9, "n_samples": 64, "reference": "reference set (val)"},
        "IS": {"value": 160.0, "std": 2.0, "n_samples": 64},
        "PSNR": {"value": 24.6, "std": 3.9, "n_samples": 64},
        "SSIM": {"value": 0.60, "std": 0.13, "n_samples": 64},
    }
    run["task"] = {"task": "superres", "degradation": "pil_bicubic", "factor": 4, "eval_seed": 0, "images": 64,
                   "split": "reference set (val)", "examples": EXAMPLES}
    return run


def _bins() -> dict:
    bins = {"0-10%": {"count": 20, "FID": 1.25, "LPIPS": {"value": 0.011, "std": 0.004}},
            "10-20%": {"count": 30, "FID": 3.5, "LPIPS": {"value": 0.031, "std": 0.008}},
            "40-50%": {"count": 13, "FID": 25.99, "LPIPS": {"value": 0.09, "std": 0.0145}},
            "50-60%": {"count": 1, "FID": None, "FID_note": "1 image(s): FID needs at least 2",
                       "LPIPS": {"value": 0.12, "std": 0.0}},
            "90-100%": {"count": 0, "FID": None, "FID_note": "0 image(s): FID needs at least 2"}}
    return bins


def inpaint_run(name: str = "inpaint_smoke") -> dict:
    """A not-comparable inpainting run, as smoke_inpaint writes it."""
    run = _base(name, INPAINT_KEY, False)
    run["metrics"] = {
        "FID": {"value": 5.86, "ci95": [0.11, 12.4], "n_samples": 64},
        "FID_all": {"value": 5.86, "n_samples": 64, "reference": "the same images, unmasked"},
        "LPIPS_all": {"value": 0.0445, "std": 0.0282, "n_samples": 64},
        "FID_40-50pct_masked": {"value": 25.99, "n_samples": 13},
        "LPIPS_40-50pct_masked": {"value": 0.09, "std": 0.0145, "n_samples": 13},
    }
    run["task"] = {"task": "inpainting", "mask_config": "thick", "eval_seed": 0, "images": 64,
                   "split": "reference set (val)", "bins": _bins(), "examples": EXAMPLES, "lpips_standin": True}
    return run


def write_run(runs: Path, run: dict, with_examples: bool = True) -> dict[str, np.ndarray]:
    """metrics.json and, as the evaluate stage writes it, evaluate/examples.npz (uint8; the mask NHW, 255 = hole)."""
    folder = runs / run["experiment"]
    (folder / "evaluate").mkdir(parents=True, exist_ok=True)
    (folder / S.METRICS_FILE).write_text(json.dumps(run))
    rng = np.random.default_rng(len(run["experiment"]))
    image = lambda: rng.integers(0, 256, (N_EXAMPLES, SIDE, SIDE, 3), dtype=np.uint8)  # noqa: E731
    arrays = {"output": image(), "target": image()}
    if run["task"]["task"] == "inpainting":
        hole = rng.random((N_EXAMPLES, SIDE, SIDE)) < 0.4
        arrays["mask"] = (hole * 255).astype(np.uint8)
        arrays["input"] = np.where(hole[..., None], np.uint8(128), arrays["target"])
    else:
        arrays["lowres"] = image()[:, ::4, ::4].repeat(4, axis=1).repeat(4, axis=2)
    if with_examples:
        np.savez(folder / EXAMPLES, **arrays)
    return arrays


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    return pd.read_csv(PAPER_DIR / "results.csv", dtype={"table": str})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    runs, out = root / "runs", root / "reports"
    arrays = {"sr_full": write_run(runs, sr_run()), "inpaint_smoke": write_run(runs, inpaint_run())}
    result = build_report(runs, out, PAPER_DIR, grid_images=0)
    return runs, out, result, arrays


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def md_tables(text: str, first_header: str) -> list[dict[str, list[str]]]:
    """Every markdown table whose first header cell is `first_header`: {first cell: row cells} (header included)."""
    lines, found = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("| ") and _cells(line)[0] == first_header and lines[i + 1].startswith("|---"):
            table = {"__header__": _cells(line)}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = _cells(row)
                table[cells[0]] = cells
            found.append(table)
    return found


def _paper_row(results: pd.DataFrame, key: dict, metric: str) -> pd.Series:
    hit = results[(results["table"] == key["table"]) & (results["dataset"] == key["dataset"])
                  & (results["method"] == key["method"]) & (results["metric"] == metric)]
    assert len(hit) == 1, (key, metric)
    return hit.iloc[0]


def _expected_metric_cells(results: pd.DataFrame, key: dict, metric: str, paper_metric: str, entry: dict) -> list[str]:
    """metric, paper (± where given), ours (± std), diff: what the page's row must say, from the two sources."""
    prow = _paper_row(results, key, paper_metric)
    paper = fmt(float(prow["value"])) + ("" if pd.isna(prow["plus_minus"]) else f" ± {fmt(float(prow['plus_minus']))}")
    ours = fmt(entry["value"]) + ("" if entry.get("std") is None else f" ± {fmt(entry['std'])} (std)")
    diff = entry["value"] - float(prow["value"])
    name = metric if metric == paper_metric else f"{metric} (paper: {paper_metric})"
    return [name, paper, ours, f"{fmt_signed(diff)} ({diff / abs(float(prow['value'])):+.1%})"]


SR_EXPECTED = {"FID_valsplit_ref": Verdict.REPRODUCED, "FID_trainsplit_ref": Verdict.NOT_REPRODUCED,
               "IS": Verdict.REPRODUCED, "PSNR": Verdict.REPRODUCED, "SSIM": Verdict.NOT_REPRODUCED}


def test_superres_page_rows_equal_metrics_and_paper(built, results):
    _, out, result, _ = built
    (table,) = md_tables((out / "sr_full.md").read_text(), "metric")
    run = sr_run()
    for metric, verdict in SR_EXPECTED.items():
        row = table[metric]
        assert row[:4] == _expected_metric_cells(results, SR_KEY, metric, metric, run["metrics"][metric]), metric
        assert row[-1] == VERDICT_TEXT[verdict], metric
    # Tab. 5's LDM row has no plain FID: ours is listed without a paper value, and its samples/s is not compared
    assert table["FID"][1] == MISSING and table["FID"][-1] == VERDICT_TEXT[Verdict.NO_PAPER_VALUE]
    assert not any(k.startswith("samples_per_sec") for k in table)
    assert list(table)[1:6] == list(SR_EXPECTED)  # the paper's metrics first, in the table's order
    assert result["verdicts"]["sr_full"]["generation"] == str(Verdict.NOT_REPRODUCED)


def test_inpainting_page_is_not_comparable_and_rows_equal_their_sources(built, results):
    _, out, result, _ = built
    page = (out / "inpaint_smoke.md").read_text()
    assert "NOT COMPARABLE WITH THE PAPER" in page
    (table,) = md_tables(page, "metric")
    run = inpaint_run()
    for metric in ("FID_all", "LPIPS_all", "FID_40-50pct_masked", "LPIPS_40-50pct_masked"):
        row = table[metric]
        assert row[:4] == _expected_metric_cells(results, INPAINT_KEY, metric, metric, run["metrics"][metric]), metric
        assert row[-1] == VERDICT_TEXT[Verdict.NOT_COMPARABLE]
    assert result["verdicts"]["inpaint_smoke"]["generation"] == str(Verdict.NOT_COMPARABLE)


def test_inpainting_bins_table_equals_task_bins(built):
    _, out, _, _ = built
    (table,) = md_tables((out / "inpaint_smoke.md").read_text(), "masked area")
    assert table["__header__"] == ["masked area", "images", "FID", "LPIPS", "LPIPS std", "note"]
    bins = _bins()
    assert list(table)[1:] == list(bins)
    for label, b in bins.items():
        lpips = b.get("LPIPS") or {}
        assert table[label][:5] == [label, str(b["count"]), fmt(b["FID"]), fmt(lpips.get("value")), fmt(lpips.get("std"))]
        assert b.get("FID_note", "") in table[label][5]
    assert "FID_40-50pct_masked" in table["40-50%"][5]


def test_task_tables_place_our_runs_among_the_papers_rows(built, results):
    """Summary and page: every row of the paper's Tab. 5 / Tab. 7 (baselines included) with its values, ours in bold
    under the row it reproduces, in the columns of the metrics it measures."""
    _, out, _, _ = built
    for key, name, run in ((SR_KEY, "sr_full", sr_run()), (INPAINT_KEY, "inpaint_smoke", inpaint_run())):
        paper_rows = results[(results["table"] == key["table"]) & (results["dataset"] == key["dataset"])]
        for where in ("summary.md", f"{name}.md"):
            tables = [t for t in md_tables((out / where).read_text(), "method") if any(name in k for k in t)]
            assert len(tables) == 1, where
            (table,) = tables
            header = table["__header__"][1:]
            assert set(header) == set(paper_rows["metric"])
            methods = [k for k in table if k != "__header__"]
            labels = [f"{m} (paper)" if ours else m for m, ours in
                      paper_rows.drop_duplicates("method")[["method", "is_ours"]].itertuples(index=False)]
            ours_label = next(m for m in methods if f"ours: {name}" in m)
            assert [m for m in methods if m != ours_label] == labels
            assert methods.index(ours_label) == methods.index(f"{key['method']} (paper)") + 1
            for method in paper_rows["method"].unique():
                label = next(lab for lab in labels if lab in (method, f"{method} (paper)"))
                for metric, value in paper_rows[paper_rows["method"] == method][["metric", "value"]].itertuples(index=False):
                    assert table[label][1 + header.index(metric)] == fmt(float(value)), (where, method, metric)
            for metric, cell in zip(header, table[ours_label][1:]):
                expected = f"**{fmt(run['metrics'][metric]['value'])}**" if metric in run["metrics"] and metric != "FID" else MISSING
                assert cell == expected, (where, metric)
    summary = (out / "summary.md").read_text()
    assert "SR3" in summary and "LaMa (recomputed)" in summary and "DeepFill v2" in summary
    assert "(NOT COMPARABLE)" in next(k for t in md_tables(summary, "method") for k in t if "ours: inpaint_smoke" in k)


def test_overview_and_summary_json_use_each_tables_headline_metric(built):
    _, out, _, _ = built
    (overview,) = md_tables((out / "summary.md").read_text(), "experiment")
    sr = next(v for k, v in overview.items() if "sr_full" in k)
    assert sr[4:7] == ["FID_valsplit_ref", fmt(2.8), fmt(2.9)]
    inpaint = next(v for k, v in overview.items() if "inpaint_smoke" in k)
    assert inpaint[4:7] == ["FID_all", fmt(2.15), fmt(5.86)]
    summary = json.loads((out / "metrics_summary.json").read_text())["experiments"]
    psnr = summary["sr_full"]["generation"]["metrics"]["PSNR"]
    assert (psnr["paper"], psnr["paper_plus_minus"], psnr["ours"], psnr["std"]) == (24.4, 3.8, 24.6, 3.9)
    assert summary["inpaint_smoke"]["generation"]["task"]["bins"] == _bins()


def test_example_figures_show_the_examples_file(built):
    """The figure's images, read back from the matplotlib artists, are examples.npz's arrays in the task's column
    order (LR | SR | HR; input | mask | result | original), one example per row; the figure is written, linked from
    the page and owned by the experiment."""
    runs, out, result, arrays = built
    order = {"sr_full": ["lowres", "output", "target"], "inpaint_smoke": ["input", "mask", "output", "target"]}
    titles = {"sr_full": ["LR (input)", "SR (ours)", "HR (original)"],
              "inpaint_smoke": ["input", "mask", "result (ours)", "original"]}
    for name, run in (("sr_full", sr_run()), ("inpaint_smoke", inpaint_run())):
        columns = task_example_columns(runs / name, run["task"])
        fig, title = task_examples_figure(columns, name, comparable=run["comparable"])
        assert (NOT_COMPARABLE_TAG in title) is (not run["comparable"])
        axes = fig.axes
        assert len(axes) == N_EXAMPLES * len(order[name])
        assert [ax.get_title() for ax in axes[:len(order[name])]] == titles[name]
        for i, ax in enumerate(axes):
            row, col = divmod(i, len(order[name]))
            (im,) = ax.get_images()
            expected = arrays[name][order[name][col]][row]
            assert np.array_equal(np.asarray(im.get_array()), expected), (name, row, col)
            if expected.ndim == 2:  # the mask: grey from 0 to 255, 255 = hole drawn white
                assert (im.norm.vmin, im.norm.vmax, im.get_cmap().name) == (0, 255, "gray")
        rel = f"figures/{figure_name(name, FIG_TASK_EXAMPLES)}"
        assert str(out / rel) in result["written"] and (out / rel).is_file()
        assert f"]({rel})" in (out / f"{name}.md").read_text()
        assert rel in experiment_files(name)


def test_publish_copies_the_example_figure(built, tmp_path):
    _, out, _, _ = built
    target = tmp_path / "published"
    publish(out, target, PAPER_DIR, experiments=["inpaint_smoke"])
    rel = f"figures/{figure_name('inpaint_smoke', FIG_TASK_EXAMPLES)}"
    assert (target / rel).read_bytes() == (out / rel).read_bytes()


def test_tab6_reports_fid_all_as_its_2k_validation_fid(tmp_path, results):
    run = inpaint_run("inpaint_tab6")
    run["paper"] = {"table": "6", "dataset": "Places", "method": "LDM-4 (KL, w/ attn)"}
    run["comparable"], run["not_comparable_reasons"] = True, []
    runs = tmp_path / "runs"
    write_run(runs, run, with_examples=False)  # a metrics file without its examples: no figure, no error
    result = build_report(runs, tmp_path / "rep", PAPER_DIR, grid_images=0)
    assert not (tmp_path / "rep" / "figures" / figure_name("inpaint_tab6", FIG_TASK_EXAMPLES)).exists()
    page = (tmp_path / "rep" / "inpaint_tab6.md").read_text()
    (table,) = md_tables(page, "metric")
    key = run["paper"]
    row = table["FID_all (paper: FID_2k_val_after_epoch6)"]
    assert row[:4] == _expected_metric_cells(results, key, "FID_all", "FID_2k_val_after_epoch6", run["metrics"]["FID_all"])
    assert row[-1] == VERDICT_TEXT[Verdict.NOT_REPRODUCED]  # 5.86 against 15.21 +- 1.52
    for metric in ("LPIPS_all", "FID_40-50pct_masked"):  # Tab. 6 reports neither
        assert table[metric][1] == MISSING and table[metric][-1] == VERDICT_TEXT[Verdict.NO_PAPER_VALUE]
    assert result["verdicts"]["inpaint_tab6"]["generation"] == str(Verdict.NOT_REPRODUCED)
    # the context holds Tab. 6's other rows, sampling throughput per resolution
    (context,) = [t for t in md_tables(page, "method") if any("ours: inpaint_tab6" in k for k in t)]
    assert "LDM-1 (no first stage)" in context
    assert {"sampling_throughput_samples_per_sec @ 256 px", "sampling_throughput_samples_per_sec @ 512 px"} <= set(context["__header__"])
    col = context["__header__"].index("sampling_throughput_samples_per_sec @ 512 px")
    assert context["LDM-1 (no first stage)"][col] == fmt(0.07)


def test_a_metric_without_value_is_missing_with_its_note(tmp_path):
    """A bin with fewer than two images has no FID: evaluate writes value null and a note; the report keeps the
    paper's value, calls ours missing, says why, and the run becomes inconclusive."""
    run = inpaint_run("inpaint_few")
    run["comparable"], run["not_comparable_reasons"] = True, []
    run["metrics"] = {"FID_all": {"value": 2.2, "n_samples": 64}, "LPIPS_all": {"value": 0.145, "std": 0.08},
                      "LPIPS_40-50pct_masked": {"value": 0.257, "std": 0.04},
                      "FID_40-50pct_masked": {"value": None, "n_samples": 1, "note": "1 image(s): FID needs at least 2"}}
    path = tmp_path / "inpaint_few" / S.METRICS_FILE
    path.parent.mkdir()
    path.write_text(json.dumps(run))
    ec = compare_ldm(S.load_metrics(path), load_paper_results(PAPER_DIR))
    row = ec.row("FID_40-50pct_masked")
    assert row.verdict is Verdict.MISSING and row.comparison.paper == pytest.approx(11.87)
    assert "FID needs at least 2" in row.note
    assert [ec.row(m).verdict for m in ("FID_all", "LPIPS_all", "LPIPS_40-50pct_masked")] == [Verdict.REPRODUCED] * 3
    assert ec.verdict is Verdict.INCONCLUSIVE
    run["metrics"]["FID_40-50pct_masked"].pop("note")  # a null value nobody explains stays an error
    path.write_text(json.dumps(run))
    with pytest.raises(S.SchemaError, match=r"metrics\.FID_40-50pct_masked\.value"):
        S.load_metrics(path)


def test_task_record_errors_name_the_key(tmp_path):
    path = tmp_path / "x" / S.METRICS_FILE
    path.parent.mkdir()
    for broken, key in ((dict(_bins(), **{"0-10%": {"count": -1}}), r"task\.bins\.0-10%\.count"),
                        (dict(_bins(), **{"0-10%": {"count": 2, "LPIPS": {"std": 0.1}}}), r"task\.bins\.0-10%\.LPIPS")):
        run = inpaint_run("x")
        run["task"]["bins"] = broken
        path.write_text(json.dumps(run))
        with pytest.raises(S.SchemaError, match=key):
            S.load_metrics(path)


def test_examples_path_must_stay_in_the_run_folder(tmp_path):
    runs = tmp_path / "runs"
    run = sr_run("sr_escape")
    write_run(runs, run)
    shutil.copyfile(runs / "sr_escape" / EXAMPLES, tmp_path / "outside.npz")
    run["task"]["examples"] = "../../outside.npz"
    with pytest.raises(PathEscapeError, match="task.examples"):
        task_example_columns(runs / "sr_escape", run["task"])
    del run["task"]["examples"]
    assert task_example_columns(runs / "sr_escape", run["task"]) is None
    np.savez(runs / "sr_escape" / EXAMPLES, output=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\['lowres', 'target'\] missing"):
        task_example_columns(runs / "sr_escape", sr_run()["task"])


def _html_rows(html: str, label: str) -> list[list[str]]:
    """The cells of every rendered DataFrame row whose index is `label`."""
    rows = re.findall(rf"<tr>\s*<th>{re.escape(label)}</th>(.*?)</tr>", html, flags=re.S)
    return [re.findall(r"<td>(.*?)</td>", row, flags=re.S) for row in rows]


def _same(cell: str, value) -> bool:
    if value is None:
        return cell in ("NaN", "None", "")
    try:
        return float(cell) == pytest.approx(float(value), abs=1e-9 + 1e-4 * abs(float(value)))
    except ValueError:
        return cell == str(value)


def test_notebook_renders_the_task_tables(built, monkeypatch):
    """notebooks/comparison.ipynb on a reports folder with a super-resolution and an inpainting run: the paper-row
    comparison of each (paper, its ±, ours, our std, diff, verdict), the per-bin table, the paper's context rows and
    both example figures."""
    from test_notebook import _execute, _text

    _, out, _, _ = built
    nb = _execute(out, monkeypatch)
    text = _text(nb)
    assert "_no super-resolution or inpainting runs_" not in text
    (cell,) = [c for c in nb.cells if "task_runs" in c.source]
    html = "".join(o.get("data", {}).get("text/html", "") for o in cell.get("outputs", []))
    summary = json.loads((out / "metrics_summary.json").read_text())["experiments"]
    for name, metrics in (("sr_full", list(SR_EXPECTED)), ("inpaint_smoke", ["FID_all", "LPIPS_all", "FID_40-50pct_masked",
                                                                              "LPIPS_40-50pct_masked"])):
        for metric in metrics:
            m = summary[name]["generation"]["metrics"][metric]
            expected = [m["paper_metric"], m["paper"], m["paper_plus_minus"], m["ours"], m["std"], m["diff"], m["verdict"]]
            rows = [r for r in _html_rows(html, metric) if r and r[0] == metric]
            assert len(rows) == 1 and all(_same(c, v) for c, v in zip(rows[0], expected)), (name, metric, rows)
    for label, b in _bins().items():
        (row,) = _html_rows(html, label)
        lpips = b.get("LPIPS") or {}
        assert all(_same(c, v) for c, v in zip(row, [b["count"], b["FID"], lpips.get("value"), lpips.get("std")])), (label, row)
        assert row[4] == b.get("FID_note", "")
    assert "SR3" in text and "LaMa (recomputed)" in text  # the summary page's context tables
    shown = {o["data"]["text/markdown"].strip("*") for c in nb.cells for o in c.get("outputs", [])
             if o.get("data", {}).get("text/markdown", "").endswith(".png**")}
    assert {figure_name("sr_full", FIG_TASK_EXAMPLES), figure_name("inpaint_smoke", FIG_TASK_EXAMPLES)} <= shown
