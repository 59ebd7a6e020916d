"""Stage 1: raw files -> prepared images (download or check, verify, preprocess as the paper, write)."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from replication.stages.context import StageContext
from replication.stages.entry import hydra_entry
from replication.stages.execute import execute
from replication.stages.lock import folder_lock

STAGE = "prepare"


def _body(ctx: StageContext) -> dict[str, Any]:
    from replication.data.prepare import REFERENCE, prepare_dataset, reference_splits

    dataset = ctx.typed.dataset
    result: dict[str, Any] = {"dataset": dataset.name, "splits": {}}
    outputs = []
    # train (training preprocessing), the splits behind the FID reference set, and the reference set itself
    # (evaluation preprocessing, no flips; paper Sec. E.3.1 uses the training set)
    splits = ["train", *[s.value for s in reference_splits(dataset) if s.value != "train"], REFERENCE]
    # prepared folders are shared by every experiment of the dataset: one writer at a time there too
    with folder_lock(dataset.prepared_dir, f"prepare {dataset.name} for {ctx.root.name}"):
        for split in splits:
            summary = prepare_dataset(dataset, split, progress=ctx.progress)
            result["splits"][split] = summary
            outputs.append(summary["path"])
            ctx.stats(event="prepared", split=split, count=summary["count"], spec_hash=summary["spec_hash"])
    result["outputs"] = outputs
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    return execute(STAGE, cfg, _body)


main = hydra_entry(run)

if __name__ == "__main__":
    main()
