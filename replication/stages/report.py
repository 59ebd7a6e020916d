"""Stage 7: comparison tables and figures against the paper, from metrics files only, written to the run-output
reports folder `reports_dir` (default `<runs_root>/reports`, not tracked). `python -m replication.report publish`
copies chosen finished reports from there into the tracked `reports/`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from replication.samples import grid_indices, load_sample_subset
from replication.stages.artifacts import METRICS_FILE, RECON_METRICS_FILE, SAMPLES_DIR, num_label_classes
from replication.stages.context import StageContext
from replication.stages.entry import hydra_entry
from replication.stages.execute import execute

STAGE = "report"
PAPER_DIR = Path(__file__).resolve().parents[2] / "reports" / "paper"


def _body(ctx: StageContext) -> dict[str, Any]:
    from replication.report.build import FIG_SAMPLES, FIG_TRAIN_IMAGES, FIGURES_DIR, build_report, figure_name
    from replication.report.figures import sample_grid

    root = ctx.root
    reports = Path(root.reports_dir)
    outputs: list[Path] = []
    for name in (METRICS_FILE, RECON_METRICS_FILE):
        if (ctx.run_dir / name).exists():
            ctx.record_input(ctx.run_dir / name)
    samples_dir = ctx.run_dir / SAMPLES_DIR
    grid = reports / FIGURES_DIR / figure_name(root.name, FIG_SAMPLES)
    grid.unlink(missing_ok=True)  # a grid of earlier samples must not outlive them
    (reports / FIGURES_DIR / figure_name(root.name, FIG_TRAIN_IMAGES)).unlink(missing_ok=True)
    if (samples_dir / "index.json").exists():
        from replication.utils.io import read_json

        total = int(read_json(samples_dir / "index.json")["num_samples"])
        indices, how = grid_indices(total, num_label_classes(ctx.typed) if root.kind.value == "ldm" else None)
        samples = load_sample_subset(samples_dir, indices)
        title = (f"{root.name}: samples" + (f", {how}" if how else "")
                 + ("" if root.comparable else " (NOT COMPARABLE: smoke)"))
        sample_grid(np.asarray(samples), grid, nrow=8, title=title)
        outputs.append(grid)
        outputs.append(_training_grid(ctx, reports, len(indices)))
    paper_dir = Path(os.path.relpath(PAPER_DIR))  # relative, so generated pages name no machine's folders
    # this experiment's pages and figures; the summary keeps every other experiment reported into `reports`
    built = build_report(Path(root.runs_root), reports, paper_dir, experiments=[root.name], grid_images=0)
    written = [Path(p) for p in built.get("written", [])]
    return {"report": str(reports / f"{root.name}.md"), "verdicts": built.get("verdicts", {}),
            "written": [str(p) for p in written], "outputs": outputs + [p for p in written if p.exists()]}


def _training_grid(ctx: StageContext, reports: Path, count: int) -> Path:
    """The first `count` prepared training images, drawn like the sample grid, so that a reader sees whether the
    samples have the structure of what the model was trained on."""
    from replication.data.prepare import open_prepared
    from replication.report.build import FIG_TRAIN_IMAGES, FIGURES_DIR, figure_name
    from replication.report.figures import sample_grid

    images = open_prepared(ctx.typed.dataset, "train")
    path = reports / FIGURES_DIR / figure_name(ctx.root.name, FIG_TRAIN_IMAGES)
    sample_grid(images.get_batch(np.arange(min(count, len(images)))), path, nrow=8,
                title=f"{ctx.root.name}: training images (first {min(count, len(images))} of {len(images)})")
    return path


def run(cfg: DictConfig) -> dict[str, Any]:
    return execute(STAGE, cfg, _body)


main = hydra_entry(run)

if __name__ == "__main__":
    main()
