"""Tests of replication/report: verdict rule, paper lookups, protocol deviations, and build_report on fake runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from replication.report import schema as S
from replication.report.build import build_report
from replication.report.compare import compare_ldm
from replication.report.figures import ANNOTATIONS_KEY, MIXED_TAG, NOT_COMPARABLE_TAG, sample_grid
from replication.report.paper import PaperKeyError, load_paper_results
from replication.report.protocol import ProtocolStatus, compare_protocol, deviations
from replication.report.tables import DEVIATION_FLAG
from replication.report.verdict import DEFAULT_TOLERANCES, Tolerance, Verdict, judge, overall

REPO = Path(__file__).resolve().parents[1]
PAPER_DIR = REPO / "reports" / "paper"


# ---------------------------------------------------------------------------------------------------------
# Fixtures: fake runs written the way the evaluate stage writes them (schema in report/schema.py)

def _paper_protocol() -> dict:
    return {"num_samples": 50000, "sampler": "ddim", "steps": 200, "eta": 0.0, "guidance_scale": None,
            "feature_extractor": "inception-v3-compat", "pr_protocol": "adm-inception-k3",
            "reference_set": "train", "train_steps": 500000}


def comparable_run() -> dict:
    proto = _paper_protocol()
    proto.update({"num_samples": 10000, "steps_run": 200, "ddim_spacing": "original", "ema": True,
                  "evaluator": "torch-fidelity 0.4.0", "reference_images": 126227, "autoencoder": "kl-f8"})
    return {
        "schema_version": 1, "experiment": "churches_full", "created": "2026-11-27T10:00:00Z",
        "comparable": True, "not_comparable_reasons": [],
        "paper": {"table": "1", "dataset": "LSUN-Churches", "method": "LDM-8 (KL)"},
        "metrics": {
            "FID": {"value": 4.10, "ci95": [3.95, 4.25], "n_samples": 10000},
            "precision": {"value": 0.70, "ci95": None, "n_samples": 10000, "protocol": "adm-inception-k3"},
            "recall": {"value": 0.515, "ci95": None, "n_samples": 10000, "protocol": "adm-inception-k3"},
            "IS": {"value": 2.9, "std": 0.05, "n_samples": 10000},
        },
        "fid_extrapolated_infinity": None,
        "protocol": proto,
        "paper_protocol": _paper_protocol(),
        "curves": {
            "fid_vs_ddim_steps": [{"steps": s, "FID": 30.0 / np.sqrt(s), "samples_per_s": 400.0 / s} for s in (10, 20, 50, 100, 200)],
            "fid_vs_train_steps": [{"train_step": t, "FID": 200.0 / np.log(t)} for t in (1000, 10000, 100000)],
            "train_loss": [{"step": i, "loss": 1.0 / i} for i in range(1, 6)],
        },
        "throughput": {"sampling_img_per_s": 8.6, "device": "cpu"},
    }


def smoke_run() -> dict:
    run = comparable_run()
    run.update({"experiment": "smoke", "comparable": False,
                "not_comparable_reasons": ["smoke experiment (tiny data, tiny model)", "stand-in feature extractor"]})
    # Numbers identical to the paper's: a smoke run must still never be called reproduced.
    paper = load_paper_results(PAPER_DIR)
    run["metrics"] = {"FID": {"value": paper.value(1, "LSUN-Churches", "LDM-8 (KL)", "FID"), "ci95": None, "n_samples": 64}}
    run["protocol"] = dict(run["protocol"], num_samples=64, feature_extractor="standin-random-conv")
    run["curves"] = {"fid_vs_ddim_steps": [{"steps": 2, "FID": 300.0, "samples_per_s": 50.0}, {"steps": 5, "FID": 250.0, "samples_per_s": 20.0}]}
    return run


def recon_run() -> dict:
    return {"schema_version": 1, "experiment": "ae_kl_f8", "autoencoder": "kl-f8", "f": 8, "comparable": True,
            "not_comparable_reasons": [], "n_images": 1000, "paper": {"name": "kl-f8"},
            "metrics": {"rFID": {"value": 0.95}, "rIS": {"value": 200.0, "std": 4.0}, "PSNR": {"value": 24.0, "std": 4.1},
                        "SSIM": {"value": 0.70, "std": 0.15}, "LPIPS": {"value": 0.12, "std": 0.05}}}


def _write(runs: Path, name: str, fname: str, obj: dict) -> Path:
    p = runs / name / fname
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))
    return p


@pytest.fixture(scope="module")
def paper():
    return load_paper_results(PAPER_DIR)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    runs, out = root / "runs", root / "reports"
    _write(runs, "churches_full", S.METRICS_FILE, comparable_run())
    _write(runs, "smoke", S.METRICS_FILE, smoke_run())
    _write(runs, "ae_kl_f8", S.RECON_METRICS_FILE, recon_run())
    write_sample_folder(runs / "smoke", np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    result = build_report(runs, out, PAPER_DIR)
    return out, result


def write_sample_folder(run_dir: Path, images: np.ndarray, shard_size: int = 4) -> Path:
    """A finished sample folder as the sample stage leaves it: its folder, shard names and index.json keys."""
    from replication.samples import SHARD_PATTERN
    from replication.stages.artifacts import SAMPLES_DIR

    out = run_dir / SAMPLES_DIR
    out.mkdir(parents=True)
    num_shards = -(-len(images) // shard_size)
    for s in range(num_shards):
        np.save(out / SHARD_PATTERN.format(s), images[s * shard_size:(s + 1) * shard_size])
    (out / "index.json").write_text(json.dumps({"num_samples": len(images), "shard_size": shard_size, "num_shards": num_shards,
                                                "steps": 5, "made_now": len(images), "img_per_s": 1.0}))
    return out


# ---------------------------------------------------------------------------------------------------------
# Verdict rule

def test_verdict_interval_inside_band_is_reproduced():
    # FID 10 -> band 10 +- max(1.0, 0.5) = [9, 11]
    c = judge(S.FID, 10.2, 10.0, (9.5, 10.9))
    assert c.verdict is Verdict.REPRODUCED
    assert c.band == pytest.approx((9.0, 11.0))
    assert c.diff == pytest.approx(0.2)


def test_verdict_interval_outside_band_either_side_is_not_reproduced():
    assert judge(S.FID, 12.0, 10.0, (11.5, 12.5)).verdict is Verdict.NOT_REPRODUCED
    assert judge(S.FID, 7.0, 10.0, (6.5, 8.9)).verdict is Verdict.NOT_REPRODUCED  # much better is not "reproduced" either


def test_verdict_straddling_interval_is_inconclusive():
    assert judge(S.FID, 10.8, 10.0, (10.5, 11.2)).verdict is Verdict.INCONCLUSIVE
    assert judge(S.FID, 9.2, 10.0, (8.8, 9.6)).verdict is Verdict.INCONCLUSIVE


def test_verdict_without_interval_uses_the_value():
    assert judge(S.FID, 10.9, 10.0).verdict is Verdict.REPRODUCED
    assert judge(S.FID, 11.1, 10.0).verdict is Verdict.NOT_REPRODUCED


def test_verdict_absolute_floor_applies_to_small_fid():
    # paper 2.0: 10 % = 0.2 < floor 0.5, so band [1.5, 2.5]
    c = judge(S.FID, 2.45, 2.0)
    assert c.band == pytest.approx((1.5, 2.5))
    assert c.verdict is Verdict.REPRODUCED
    assert judge(S.FID, 2.55, 2.0).verdict is Verdict.NOT_REPRODUCED


def test_verdict_precision_recall_absolute_tolerance():
    assert DEFAULT_TOLERANCES[S.PRECISION] == Tolerance(absolute=0.03)
    assert judge(S.PRECISION, 0.66, 0.64).verdict is Verdict.REPRODUCED
    assert judge(S.RECALL, 0.56, 0.52).verdict is Verdict.NOT_REPRODUCED


def test_not_comparable_is_never_reproduced():
    c = judge(S.FID, 4.02, 4.02, (4.0, 4.04), comparable=False)
    assert c.verdict is Verdict.NOT_COMPARABLE
    assert overall([Verdict.REPRODUCED, Verdict.NOT_COMPARABLE]) is Verdict.NOT_COMPARABLE


def test_missing_paper_or_our_value():
    assert judge(S.KID, 0.001, None).verdict is Verdict.NO_PAPER_VALUE
    assert judge(S.FID, None, 4.02).verdict is Verdict.MISSING
    assert overall([Verdict.NO_PAPER_VALUE, Verdict.MISSING]) is Verdict.NO_PAPER_VALUE


def test_overall_takes_the_worst():
    assert overall([Verdict.REPRODUCED, Verdict.INCONCLUSIVE]) is Verdict.INCONCLUSIVE
    assert overall([Verdict.REPRODUCED, Verdict.INCONCLUSIVE, Verdict.NOT_REPRODUCED]) is Verdict.NOT_REPRODUCED
    assert overall([Verdict.REPRODUCED, Verdict.NO_PAPER_VALUE]) is Verdict.REPRODUCED
    assert overall([Verdict.REPRODUCED, Verdict.MISSING]) is Verdict.INCONCLUSIVE  # paper's P/R not computed


def test_tolerance_is_a_parameter_and_unknown_metric_fails():
    assert judge(S.FID, 11.5, 10.0, tolerance=Tolerance(relative=0.2)).verdict is Verdict.REPRODUCED
    with pytest.raises(KeyError, match="no tolerance stated for metric 'weird'"):
        judge("weird", 1.0, 1.0)
    with pytest.raises(ValueError):
        Tolerance()


def test_bootstrap_interval_missing_its_point_is_widened():
    # A biased statistic's bootstrap CI may sit above the point estimate: judge the hull [9.0, 11.6].
    assert judge(S.FID, 9.0, 10.0, (10.5, 11.6)).verdict is Verdict.INCONCLUSIVE


# ---------------------------------------------------------------------------------------------------------
# Paper lookups (values read from reports/paper/*.csv; expected numbers are the paper's)

def test_paper_value_table1_churches(paper):
    assert paper.value(1, "LSUN-Churches", "LDM-8 (KL)", "FID") == pytest.approx(4.02)
    assert paper.value("1", "LSUN-Churches", "LDM-8 (KL)", "precision") == pytest.approx(0.64)
    row = paper.row(1, "LSUN-Churches", "LDM-8 (KL)", "recall")
    assert row.value == pytest.approx(0.52) and row.is_ours and row.f == 8 and row.sampler_steps == 200


def test_paper_unknown_keys_list_close_matches(paper):
    with pytest.raises(PaperKeyError, match=r"close matches: \['LDM-8 \(KL\)'\]"):
        paper.value(1, "LSUN-Churches", "LDM-8", "FID")
    with pytest.raises(PaperKeyError, match="unknown dataset 'LSUN-Church'.*LSUN-Churches"):
        paper.value(1, "LSUN-Church", "LDM-8 (KL)", "FID")
    with pytest.raises(PaperKeyError, match="unknown table '99'"):
        paper.rows(99)
    with pytest.raises(PaperKeyError, match="unknown autoencoder 'kl-f9'.*kl-f8"):
        paper.autoencoder("kl-f9")


def test_paper_ambiguous_row_needs_resolution(paper):
    with pytest.raises(PaperKeyError, match="ambiguous"):
        paper.value(9, "OpenImages", "LDM-4 (200 steps)", "FID")
    assert paper.value(9, "OpenImages", "LDM-4 (200 steps)", "FID", resolution=256) == pytest.approx(32.02)


def test_autoencoder_rows_and_table8_link(paper):
    ae = paper.autoencoder("kl-f8")
    assert ae["rFID"] == pytest.approx(0.90) and ae["PSNR"] == pytest.approx(24.19) and ae["f"] == 8
    assert paper.table8_method("kl-f8") == "KL f=8 c=4"
    assert paper.table8_method("vq-f4-noattn") == "VQ (attention-free) f=4 |Z|=8192 c=3"
    ssim = paper.recon_value("kl-f8", S.SSIM)
    assert ssim[0] == pytest.approx(0.69)
    # The README zoo (autoencoders.csv) and Tab.8 (results.csv) agree on rFID for every released model.
    for name in paper.autoencoder_names():
        label = paper.table8_method(name)
        assert label is not None, name
        assert paper.value(8, "ImageNet-Val", label, "R-FID") == pytest.approx(paper.autoencoder(name)["rFID"])


def test_context_table_holds_baselines(paper):
    ctx = paper.context_table(1, "LSUN-Churches", ["FID", "precision", "recall"])
    assert "StyleGAN2" in ctx.index and "LDM-8 (KL)" in ctx.index
    assert bool(ctx.loc["LDM-8 (KL)", "is_ours"]) and not bool(ctx.loc["StyleGAN2", "is_ours"])
    raw = pd.read_csv(PAPER_DIR / "results.csv", dtype={"table": str})
    expected = raw[(raw.table == "1") & (raw.dataset == "LSUN-Churches") & (raw.metric == "FID")]
    assert len(ctx) == len(expected)


# ---------------------------------------------------------------------------------------------------------
# Protocol

def test_protocol_deviations_listed():
    ours = {"num_samples": 10000, "sampler": "ddim", "steps": 200, "steps_run": 100, "eta": 0.0, "ema": True, "guidance_scale": None}
    paper = {"num_samples": 50000, "sampler": "ddim", "steps": 200, "eta": 1.0, "guidance_scale": None, "reference_set": "train"}
    devs = {e.key: e for e in deviations(ours, paper)}
    assert set(devs) == {"num_samples", "eta", "steps_run", "reference_set"}
    assert (devs["num_samples"].paper, devs["num_samples"].ours) == (50000, 10000)
    assert devs["steps_run"].paper == 200  # checked against the paper's "steps"
    assert devs["reference_set"].status is ProtocolStatus.NOT_RECORDED
    status = {e.key: e.status for e in compare_protocol(ours, paper)}
    assert status["ema"] is ProtocolStatus.NOT_STATED
    assert status["sampler"] is ProtocolStatus.MATCHES and status["guidance_scale"] is ProtocolStatus.MATCHES


def test_protocol_types_are_not_conflated():
    assert [e.key for e in deviations({"ema": 1}, {"ema": True})] == ["ema"]
    assert deviations({"eta": 0}, {"eta": 0.0}) == []


# ---------------------------------------------------------------------------------------------------------
# Schema

def test_schema_errors_name_file_and_key(tmp_path):
    bad = comparable_run()
    del bad["comparable"]
    p = _write(tmp_path, "x", S.METRICS_FILE, bad)
    with pytest.raises(S.SchemaError, match=r"metrics\.json: key 'comparable'"):
        S.load_metrics(p)
    bad = comparable_run()
    bad["schema_version"] = 2
    with pytest.raises(S.SchemaError, match="unsupported schema version 2"):
        S.load_metrics(_write(tmp_path, "y", S.METRICS_FILE, bad))
    bad = comparable_run()
    bad["metrics"]["FID"]["ci95"] = [5.0, 4.0]
    with pytest.raises(S.SchemaError, match=r"key 'metrics\.FID\.ci95'"):
        S.load_metrics(_write(tmp_path, "z", S.METRICS_FILE, bad))
    bad = recon_run()
    bad["f"] = "8"
    with pytest.raises(S.SchemaError, match="key 'f'"):
        S.load_recon_metrics(_write(tmp_path, "w", S.RECON_METRICS_FILE, bad))


def test_unknown_paper_key_in_run_fails_clearly(tmp_path, paper):
    bad = comparable_run()
    bad["paper"]["method"] = "LDM-8"
    run = S.load_metrics(_write(tmp_path, "x", S.METRICS_FILE, bad))
    with pytest.raises(PaperKeyError, match="LDM-8 \\(KL\\)"):
        compare_ldm(run, paper)


# ---------------------------------------------------------------------------------------------------------
# build_report on fake runs

def test_build_report_writes_expected_files(built):
    out, result = built
    for rel in ["summary.md", "summary.csv", "metrics_summary.json", "churches_full.md", "smoke.md", "ae_kl_f8.md",
                "figures/churches_full_fid_vs_ddim_steps.png", "figures/churches_full_fid_vs_throughput.png",
                "figures/churches_full_fid_vs_train_steps.png", "figures/churches_full_train_loss.png",
                "figures/smoke_samples.png", "figures/fid_vs_ddim_steps.png", "figures/fid_vs_throughput.png",
                "figures/fid_vs_train_steps.png", "figures/recon_vs_f.png", "figures/fid_ours_vs_paper.png",
                "plots/churches_full_fid_vs_steps.csv", "plots/churches_full_fid_vs_train_steps.csv",
                "plots/recon_vs_f.csv", "plots/fid_ours_vs_paper.csv"]:
        assert (out / rel).is_file(), rel
        assert str(out / rel) in result["written"]
    for p in result["written"]:
        if p.endswith(".png"):
            with Image.open(p) as im:
                im.verify()
                assert im.format == "PNG"
    assert result["plots"], "DVC plot definitions returned"


def test_build_report_verdicts(built, paper):
    out, result = built
    assert result["verdicts"]["smoke"]["generation"] == "not comparable"
    # churches_full: FID CI [3.95, 4.25] inside 4.02 +- 0.5; precision 0.70 vs 0.64 (tol 0.03) -> not reproduced.
    assert result["verdicts"]["churches_full"]["generation"] == "not reproduced"
    summary = json.loads((out / "metrics_summary.json").read_text())
    m = summary["experiments"]["churches_full"]["generation"]["metrics"]
    assert m["FID"]["verdict"] == "reproduced" and m["FID"]["paper"] == pytest.approx(4.02)
    assert m["precision"]["verdict"] == "not reproduced"
    assert m["recall"]["verdict"] == "reproduced"
    assert m["IS"]["verdict"] == "no paper value"
    assert summary["experiments"]["smoke"]["generation"]["metrics"]["FID"]["verdict"] == "not comparable"
    recon = summary["experiments"]["ae_kl_f8"]["reconstruction"]["metrics"]
    assert recon["rFID"]["paper"] == pytest.approx(paper.autoencoder("kl-f8")["rFID"])
    assert recon["rFID"]["verdict"] == "reproduced"  # 0.95 vs 0.90 +- max(0.09, 0.1)
    assert recon["LPIPS"]["verdict"] == "no paper value"
    frame = pd.read_csv(out / "summary.csv")
    row = frame[(frame.experiment == "churches_full") & (frame.metric == "FID")].iloc[0]
    assert row["diff"] == pytest.approx(4.10 - 4.02)


def test_smoke_banner_and_deviation_flags(built):
    out, _ = built
    smoke = (out / "smoke.md").read_text()
    first = smoke.split("\n## ")[0]
    assert "**NOT COMPARABLE WITH THE PAPER" in first, "banner at the top, in bold"
    assert "stand-in feature extractor" in first
    assert "✅" not in smoke, "a smoke run is never marked reproduced"
    assert "| FID | 4.02 | 4.02 | +0.00 (+0.0%) |" in smoke and "🚫 not comparable" in smoke
    full = (out / "churches_full.md").read_text()
    assert "NOT COMPARABLE" not in full
    dev_lines = [line for line in full.splitlines() if DEVIATION_FLAG in line]
    assert any(line.startswith("| num_samples | 50000 | 10000 |") for line in dev_lines)
    assert "| sampler | ddim | ddim | ✓ matches |" in full
    assert "| FID | 4.02 | 4.10 | +0.08 (+2.0%) | [3.95, 4.25] | [3.52, 4.52] | 10000 | ✅ reproduced |" in full
    summary = (out / "summary.md").read_text()
    assert "StyleGAN2" in summary and "**→ ours: churches_full**" in summary and "**→ ours: smoke** (NOT COMPARABLE)" in summary
    assert "Verdict rule" in summary


def _png_title(path: Path) -> str:
    with Image.open(path) as im:
        return im.text.get("Title", "")


def test_figures_of_smoke_run_are_titled_not_comparable(built):
    out, _ = built
    figs = out / "figures"
    assert _png_title(figs / "smoke_fid_vs_ddim_steps.png").startswith(NOT_COMPARABLE_TAG)
    assert _png_title(figs / "smoke_samples.png") == NOT_COMPARABLE_TAG
    assert NOT_COMPARABLE_TAG not in _png_title(figs / "churches_full_fid_vs_ddim_steps.png")
    assert MIXED_TAG in _png_title(figs / "fid_vs_ddim_steps.png")  # both runs on one plot
    assert "figures/smoke_fid_vs_ddim_steps.png" in (out / "smoke.md").read_text()


def test_curve_csv_matches_metrics(built):
    out, _ = built
    frame = pd.read_csv(out / "plots" / "churches_full_fid_vs_steps.csv")
    run = comparable_run()
    expected = sorted(run["curves"]["fid_vs_ddim_steps"], key=lambda p: p["steps"])
    assert frame["steps"].tolist() == [p["steps"] for p in expected]
    assert np.allclose(frame["FID"], [p["FID"] for p in expected])


def test_no_runs_gives_paper_only_summary(tmp_path):
    result = build_report(tmp_path / "none", tmp_path / "rep", PAPER_DIR)
    text = Path(result["summary"]).read_text()
    assert "No runs found" in text and "LDM-8 (KL) (paper)" in text
    assert json.loads((tmp_path / "rep" / "metrics_summary.json").read_text())["experiments"] == {}


def test_named_experiment_without_metrics_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiment 'ghost'"):
        build_report(tmp_path / "runs", tmp_path / "rep", PAPER_DIR, experiments=["ghost"])


def test_sample_grid_layout(tmp_path):
    imgs = np.zeros((5, 4, 6, 3), dtype=np.uint8)
    for i in range(5):
        imgs[i] = 40 * (i + 1)
    p = sample_grid(imgs, tmp_path / "g.png", nrow=3, padding=1)
    arr = np.asarray(Image.open(p))
    assert arr.shape == (2 * (4 + 1) + 1, 3 * (6 + 1) + 1, 3)
    # image 4 sits at row 1, column 1
    assert (arr[1 + 5:1 + 5 + 4, 1 + 7:1 + 7 + 6] == 200).all()
    with pytest.raises(ValueError, match="uint8 NHWC"):
        sample_grid(imgs.astype(np.float32), tmp_path / "h.png")


def test_paper_metric_missing_from_run_is_listed_and_makes_run_inconclusive(tmp_path, paper):
    run = comparable_run()
    run["metrics"] = {"FID": {"value": 4.05, "ci95": [4.0, 4.1], "n_samples": 50000}}
    ec = compare_ldm(S.load_metrics(_write(tmp_path, "x", S.METRICS_FILE, run)), paper)
    assert [r.metric for r in ec.rows] == ["FID", "precision", "recall"]
    assert ec.row("precision").verdict is Verdict.MISSING
    assert ec.row("precision").comparison.paper == pytest.approx(0.64)
    assert ec.row("FID").verdict is Verdict.REPRODUCED
    assert ec.verdict is Verdict.INCONCLUSIVE


def test_experiment_key_must_match_run_folder(tmp_path):
    _write(tmp_path / "runs", "other_name", S.METRICS_FILE, comparable_run())
    with pytest.raises(S.SchemaError, match="key 'experiment' is 'churches_full' but the run folder is 'other_name'"):
        build_report(tmp_path / "runs", tmp_path / "rep", PAPER_DIR)


def test_loss_curve_follows_the_training_that_made_the_weights():
    """Append-only stats: an earlier training of another configuration is dropped at the last fresh start, and
    steps replayed after a resume keep their latest record."""
    from replication.stages.evaluate import train_loss_curve

    old = [{"event": "train_begin", "step": 0, "resumed_from": None}] + [
        {"event": "train", "step": s, "loss": 9.0} for s in (1, 100, 200, 300)]
    fresh = [{"event": "train_begin", "step": 0, "resumed_from": None},
             {"event": "train", "step": 1, "loss": 1.0}, {"event": "train", "step": 5, "loss": 0.5},
             {"event": "train", "step": 10, "loss": 0.4},  # killed after this record, checkpoint at step 5
             {"event": "train_begin", "step": 5, "resumed_from": 5},
             {"event": "train", "step": 10, "loss": 0.45}, {"event": "train", "step": 15, "loss": 0.3}]
    assert train_loss_curve(old + fresh) == [{"step": 1, "loss": 1.0}, {"step": 5, "loss": 0.5},
                                             {"step": 10, "loss": 0.45}, {"step": 15, "loss": 0.3}]
    legacy = [{"event": "train", "step": s, "loss": float(s)} for s in (1, 2)]  # stats from before the markers
    assert train_loss_curve(legacy) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_grid_of_a_finished_sample_folder_shows_its_first_samples(tmp_path):
    """The sample stage's layout (sample/samples/shard_XXXXXX.npy + index.json), several shards: the report's
    grid holds the first samples in order, across shard boundaries."""
    runs = tmp_path / "runs"
    run = smoke_run()
    run["curves"] = {}
    _write(runs, "smoke", S.METRICS_FILE, run)
    images = np.random.default_rng(1).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    write_sample_folder(runs / "smoke", images, shard_size=4)
    result = build_report(runs, tmp_path / "rep", PAPER_DIR, grid_images=6, grid_nrow=3)
    grid = tmp_path / "rep" / "figures" / "smoke_samples.png"
    assert str(grid) in result["written"] and "figures/smoke_samples.png" in (tmp_path / "rep" / "smoke.md").read_text()
    expected = sample_grid(images[:6], tmp_path / "expected.png", nrow=3, title=NOT_COMPARABLE_TAG)
    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(expected)))


def test_not_comparable_page_states_what_the_run_shows(tmp_path):
    runs = tmp_path / "runs"
    run = smoke_run()
    run["curves"]["fid_vs_train_steps"] = [{"train_step": 300, "FID": 82.5}, {"train_step": 100, "FID": 80.2},
                                           {"train_step": 200, "FID": 81.3}]
    _write(runs, "smoke", S.METRICS_FILE, run)
    ae = dict(recon_run(), experiment="smoke_ae", comparable=False, not_comparable_reasons=["smoke experiment"])
    _write(runs, "smoke_ae", S.RECON_METRICS_FILE, ae)
    _write(runs, "churches_full", S.METRICS_FILE, dict(comparable_run(), curves={}))
    build_report(runs, tmp_path / "rep", PAPER_DIR, grid_images=0)
    lines = [ln for ln in (tmp_path / "rep" / "smoke.md").read_text().splitlines() if ln.startswith("**What this run shows:**")]
    assert lines == ["**What this run shows:** autoencoder reconstruction PSNR on the validation images n/a (not recorded "
                     "by this run); FID 80.20 at the first training snapshot (step 100) and 82.50 at the last (step 300); "
                     "a pipeline check, not the paper's protocol."]
    ae_page = (tmp_path / "rep" / "smoke_ae.md").read_text()
    assert "reconstruction PSNR on the validation images 24.00 dB;" in ae_page
    assert "FID at the training snapshots n/a" in ae_page
    assert "What this run shows" not in (tmp_path / "rep" / "churches_full.md").read_text()


def _png_annotations(path: Path) -> list[dict]:
    with Image.open(path) as im:
        return json.loads(im.text.get(ANNOTATIONS_KEY, "[]"))


def _expected_labels(out: Path, figure: str, axes: int) -> list[tuple[float, float, str]]:
    """(x, y, label) of every point a figure of the report annotates, from the CSV the figure plots."""
    if figure.endswith("_fid_vs_throughput.png"):
        frame = pd.read_csv(out / "plots" / figure.replace("_fid_vs_throughput.png", "_fid_vs_steps.csv"))
        return [(r.samples_per_s, r.FID, f"{int(r.steps)} st") for r in frame.itertuples()]
    if figure == "recon_vs_f.png":
        frame = pd.read_csv(out / "plots" / "recon_vs_f.csv")
        col = ("rFID", "PSNR")[axes]
        frame = frame[(frame["source"] == "paper") & frame[col].notna()]
        return [(r.f, getattr(r, col), r.name) for r in frame.itertuples()]
    raise AssertionError(f"{figure} has point labels but no rule in this test for checking them: add one")


def test_every_annotated_figure_labels_the_points_its_csv_names(built):
    """Each point label of each figure (read back from the artists, stored in the PNG) sits on a drawn point, and
    names the row of the plotted CSV at that point."""
    reports, _ = built
    annotated = _check_annotated_figures(reports)
    assert {"smoke_fid_vs_throughput.png", "churches_full_fid_vs_throughput.png", "recon_vs_f.png"} <= annotated


def test_published_figures_label_their_points():
    """The same check on the tracked reports/ (written by publish from real smoke runs)."""
    annotated = _check_annotated_figures(REPO / "reports")
    assert {"smoke_fid_vs_throughput.png", "recon_vs_f.png"} <= annotated


def _check_annotated_figures(reports: Path) -> set[str]:
    annotated = {}
    for png in sorted((reports / "figures").glob("*.png")):
        labels = _png_annotations(png)
        if labels:
            annotated[png.name] = labels
    for name, labels in annotated.items():
        for axes in sorted({a["axes"] for a in labels}):
            expected = _expected_labels(reports, name, axes)
            mine = [a for a in labels if a["axes"] == axes]
            assert len(mine) == len(expected), f"{name}: {len(mine)} labels for {len(expected)} points"
            for a in mine:
                x, y = a["xy"]
                assert any(np.allclose([x, y], p) for p in a["points"]), f"{name}: label {a['text']!r} is off every drawn point"
                rows = [e for e in expected if np.allclose([x, y], e[:2])]
                assert rows, f"{name}: label {a['text']!r} at {(x, y)} matches no row of the plotted CSV"
                assert a["text"] in {r[2] for r in rows}, f"{name}: label {a['text']!r} sits on the point of {rows[0][2]!r}"
    return set(annotated)


def test_smoke_throughput_labels_name_their_step_counts(built):
    """The smoke curve: 2 steps at 50 samples/s, 5 steps at 20 samples/s (throughput falls as steps rise)."""
    reports, _ = built
    by_text = {a["text"]: a["xy"] for a in _png_annotations(reports / "figures" / "smoke_fid_vs_throughput.png")}
    assert by_text == {"2 st": [50.0, 300.0], "5 st": [20.0, 250.0]}
