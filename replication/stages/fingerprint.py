"""Whether a stage must run. A stage's fingerprint is the config keys its result depends on (`STAGE_DEPS`) and
the content ids of its upstream stages; its `done.json` record holds that fingerprint, the size and SHA-256 of
every file it wrote and its own content id. A stage is skipped only when the fingerprint the config gives now
matches its record and every recorded file still hashes to its record; a stage of the `reuse_from` run that
passes the same check is linked instead of recomputed."""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from replication.config import RootConfig, to_container
from replication.stages.context import StageError, run_dir_for
from replication.utils.io import atomic_write_json, read_json, sha256_json
from replication.utils.paths import contained
from replication.utils.verify import content_id, verify_records

DONE_FILE = "done.json"

# which config groups / root keys each stage's result depends on (its fingerprint), and its upstream stages
STAGE_DEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("dataset",), ()),
    "train_autoencoder": (("autoencoder", "seed"), ("prepare",)),
    "encode_latents": (("trainer.use_latent_cache",), ("prepare", "train_autoencoder")),
    "train_ldm": (("unet", "diffusion", "trainer", "seed", "conditioning"), ("encode_latents",)),
    # the noisy-latent classifier of classifier guidance: the cached latents and labels, the trained LDM's
    # scale_factor, and the diffusion schedule that noises its inputs
    "train_classifier": (("classifier", "diffusion", "seed"), ("encode_latents", "train_ldm")),
    # the shard size and the sampling precision decide which files hold which images, and their pixels
    "sample": (("sampler", "seed", "curves", "sample_shard_size", "sampling_speed.precision", "conditioning"),
               ("train_ldm", "train_autoencoder", "train_classifier")),
    "evaluate": (("metrics", "curves", "paper", "paper_protocol", "comparable", "not_comparable_reason"),
                 ("sample", "train_autoencoder")),
    "report": ((), ("evaluate",)),
}

# Where things are on this machine, not what they are: left out of fingerprints, so that a runs folder that is moved
# (or a data folder mounted elsewhere) keeps its finished stages. A different raw dataset placed at the same
# name is not noticed by a fingerprint either way: `force=[prepare]` re-prepares it.
LOCATION_KEYS = {"dataset": ("root", "prepared_dir", "num_workers"), "metrics": ("reference_cache_dir",)}

# Stages whose files are a cache of a computation from their inputs (latents of the frozen encoder): re-made, they
# may differ in the last float bits (other kernels, another device) while meaning the same thing, so their content
# id is what they were made from (config and upstream content ids), not their bytes. Their files are still
# recorded and verified like every other stage's. Training would otherwise restart whenever the cache is re-made.
DERIVED_STAGES = frozenset({"encode_latents"})

# Stages a run may link from `reuse_from` (their outputs live in their own folder; evaluate and report also write
# the run's metrics.json and report pages, so they always run for the new name)
REUSABLE_STAGES = ("prepare", "train_autoencoder", "encode_latents", "train_ldm", "train_classifier", "sample")

log = logging.getLogger("replication")


def config_value(cfg: DictConfig, key: str) -> Any:
    """The plain value (dicts, lists, enums as their values) of the dotted config `key`; None when absent."""
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if isinstance(value, DictConfig):
        return to_container(value)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _guides_with_classifier(cfg: DictConfig) -> bool:
    return float(config_value(cfg, "sampler.classifier_scale") or 0.0) > 0.0


# (stage, upstream) pairs that hold only when the config uses that upstream: sampling reads the classifier only when
# it guides with it, so unguided samples depend neither on the classifier stage nor on its (disabled) record
CONDITIONAL_UPSTREAMS = {("sample", "train_classifier"): _guides_with_classifier}


def upstream_stages(stage: str, cfg: DictConfig) -> list[str]:
    """The upstream stages `stage` reads with this config: those of `STAGE_DEPS`, less a conditional one
    (`CONDITIONAL_UPSTREAMS`) the config does not use."""
    return [up for up in STAGE_DEPS[stage][1] if CONDITIONAL_UPSTREAMS.get((stage, up), lambda _: True)(cfg)]


def upstream_ids(stage: str, cfg: DictConfig) -> dict[str, Any]:
    """The content ids of `stage`'s upstream stages: what their files hold, not when they ran. A stage whose rerun
    re-made identical files (a forced prepare of the same data) leaves everything downstream valid; one that made
    other files invalidates it."""
    run_dir = run_dir_for(cfg)
    out = {}
    for up in upstream_stages(stage, cfg):
        done = run_dir / up / DONE_FILE
        out[f"upstream:{up}"] = stage_content_id(read_json(done)) if done.exists() else None
    return out


def stage_content_id(record: dict[str, Any]) -> str | None:
    """A finished stage's content id (its done.json record)."""
    return record.get("content_id")


def _fingerprint_value(cfg: DictConfig, key: str) -> Any:
    value = config_value(cfg, key)
    if key in LOCATION_KEYS and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in LOCATION_KEYS[key]}
    return value


def fingerprint(stage: str, cfg: DictConfig) -> str:
    keys, _ = STAGE_DEPS[stage]
    parts: dict[str, Any] = {"stage": stage, "config": {k: _fingerprint_value(cfg, k) for k in keys}}
    parts.update(upstream_ids(stage, cfg))
    return sha256_json(parts)


def resume_key(stage: str, cfg: DictConfig, trajectory: dict[str, Any]) -> str:
    """What a training stage's full-state checkpoint must have been written for to be resumed: the settings that
    decide the training trajectory (`trajectory`, chosen by the stage) and the content ids of its inputs. Settings
    that may change across a resume (step count, logging, checkpoint cadence, speed levers) stay out of it."""
    return sha256_json({"stage": stage, "trajectory": trajectory, **upstream_ids(stage, cfg)})


def _done_for(done: Path, stage: str, cfg: DictConfig) -> bool:
    """`done` records a finished run of `stage` with the fingerprint `cfg` gives now, and every file it recorded is
    still there with the recorded size and content (a damaged file is named in the log, and the stage runs)."""
    if not done.exists():
        return False
    record = read_json(done)
    if record.get("fingerprint") != fingerprint(stage, cfg):
        return False
    if "files" not in record:  # a record without content hashes cannot vouch for its files
        return False
    problems = verify_records(record["files"], full=True, root=cfg.runs_root)
    if problems:
        log.warning("stage %s: %d recorded file(s) no longer match what the stage wrote, so it runs again:\n  %s",
                    stage, len(problems), "\n  ".join(problems))
        return False
    return True


def is_up_to_date(stage: str, cfg: DictConfig) -> bool:
    return _done_for(run_dir_for(cfg) / stage / DONE_FILE, stage, cfg)


def verify_upstream(stage: str, cfg: DictConfig) -> None:
    """Before `stage` reads its inputs: every finished upstream stage's files must match their records (hashes
    this process computed already are not recomputed). A mismatch stops with the files named: the upstream
    stage must be re-made first (`python -m replication.run` does it, since its skip check finds the same)."""
    run_dir = run_dir_for(cfg)
    for up in upstream_stages(stage, cfg):
        done = run_dir / up / DONE_FILE
        if not done.exists():
            continue
        record = read_json(done)
        problems = verify_records(record.get("files", {}), full=True, root=cfg.runs_root)
        if problems:
            raise StageError(f"stage {stage}: the outputs of stage {up} are damaged ({'; '.join(problems[:3])}"
                             f"{'; ...' if len(problems) > 3 else ''}); they are not used. Re-make them: "
                             f"python -m replication.run experiment=... (or force=[{up}])")


def link_reusable(stage: str, cfg: DictConfig, root: RootConfig) -> bool:
    """Link `runs/<reuse_from>/<stage>` as this run's stage folder when it is done with the fingerprint this run
    would compute (same config subset, same upstream results) and its outputs exist. True if linked."""
    if not root.reuse_from or root.reuse_from == root.name or stage not in REUSABLE_STAGES:
        return False
    run_dir = run_dir_for(cfg)
    stage_dir = run_dir / stage
    if stage_dir.exists() or stage_dir.is_symlink():
        return False
    contained(cfg.runs_root, root.reuse_from, what="reuse_from run folder")
    base = Path(cfg.runs_root) / root.reuse_from / stage
    if not _done_for(base / DONE_FILE, stage, cfg):
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    stage_dir.symlink_to(os.path.relpath(base.resolve(), run_dir.resolve()), target_is_directory=True)
    log.info("stage %s of %s: linked from run %s (same config and inputs)", stage, root.name, root.reuse_from)
    return True


def decide_up_to_date(stage: str, cfg: DictConfig, root: RootConfig, forced: bool) -> bool:
    """The skip decision: link the stage from `reuse_from` where it is equal there, then True when the stage's
    record matches (never when `forced`). A stage that must run gets its own folder (a stale link from
    `reuse_from` is removed, never written through) and its upstream files verified first."""
    if not forced:
        link_reusable(stage, cfg, root)
    up_to_date = not forced and is_up_to_date(stage, cfg)
    stage_dir = run_dir_for(cfg) / stage
    if not up_to_date and stage_dir.is_symlink():  # linked from reuse_from, now stale: never write there
        stage_dir.unlink()
        log.info("stage %s of %s: no longer linked to run %s; runs in its own folder", stage, root.name,
                 root.reuse_from)
    if not up_to_date:
        verify_upstream(stage, cfg)
    return up_to_date


def done_result(stage_dir: Path) -> dict[str, Any]:
    """The result a finished stage recorded in its done.json."""
    return dict(read_json(stage_dir / DONE_FILE).get("result", {}))


def write_done(stage: str, cfg: DictConfig, stage_dir: Path, outputs: list[str], files: dict[str, Any],
               result: dict[str, Any]) -> None:
    """The stage's done.json, written last: its fingerprint, its files' records (`files`, from
    utils.verify.content_records) and its content id; a derived stage (DERIVED_STAGES) is identified by what it
    was made from."""
    if stage in DERIVED_STAGES:
        files_for_id: dict[str, Any] = {}
        upstream = {"derived_from": fingerprint(stage, cfg)}
    else:
        files_for_id, upstream = files, upstream_ids(stage, cfg)
    atomic_write_json(stage_dir / DONE_FILE, {"fingerprint": fingerprint(stage, cfg), "run_id": uuid.uuid4().hex,
                                              "content_id": content_id(files_for_id, upstream, cfg.runs_root),
                                              "outputs": outputs, "files": files, "result": result})
