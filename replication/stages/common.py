"""What every stage shares: the run folder, skip-if-up-to-date, the manifest, logging and stats.

A stage is `run(cfg) -> dict` (cfg: the composed Hydra config). `execute` wraps the stage body: it
validates the config, decides whether the stage is up to date (same config subset and same upstream
fingerprints as the last successful run, outputs present), and otherwise runs it and records a manifest
(git commit, package versions, device, seeds, content hashes of inputs) next to its outputs.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from omegaconf import DictConfig, OmegaConf

from replication.config import GROUPS, TypedConfig, to_container, validate_config
from replication.stages.lock import FolderBusy, folder_lock
from replication.utils.io import append_jsonl, atomic_write_json, atomic_write_text, read_json, sha256_file, sha256_json
from replication.utils.errors import first_line
from replication.utils.verify import content_id, content_records, verify_records

CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments"
REPO_ROOT = Path(__file__).resolve().parents[2]
DONE_FILE = "done.json"
MANIFEST_FILE = "manifest.json"
PACKAGES = ("torch", "torchvision", "numpy", "hydra-core", "omegaconf", "dvc", "torch-fidelity", "lpips",
            "safetensors", "pandas", "matplotlib", "replication")

# which config groups / root keys each stage's result depends on (its fingerprint), and its upstream stages
STAGE_DEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("dataset",), ()),
    "train_autoencoder": (("autoencoder", "seed"), ("prepare",)),
    "encode_latents": (("trainer.use_latent_cache",), ("prepare", "train_autoencoder")),
    "train_ldm": (("unet", "diffusion", "trainer", "seed", "conditioning"), ("encode_latents",)),
    # the shard size and the sampling precision decide which files hold which images, and their pixels
    "sample": (("sampler", "seed", "curves", "sample_shard_size", "sampling_speed.precision", "conditioning"),
               ("train_ldm", "train_autoencoder")),
    "evaluate": (("metrics", "curves", "paper", "paper_protocol", "comparable", "not_comparable_reason"),
                 ("sample", "train_autoencoder")),
    "report": ((), ("evaluate",)),
}

log = logging.getLogger("replication")


class StageError(RuntimeError):
    """A stage cannot run: a missing input, a failed check; the message says what to do."""


@dataclass
class StageContext:
    name: str
    cfg: DictConfig
    typed: TypedConfig
    run_dir: Path
    stage_dir: Path
    device: torch.device
    progress: bool
    inputs: dict[str, str] = field(default_factory=dict)  # path -> sha256, recorded in the manifest
    is_main: bool = True  # rank 0 (or the only process): the one that writes stats, manifest and done.json

    @property
    def root(self) -> Any:
        return self.typed.root

    def stats(self, **record: Any) -> None:
        """Append one record to the stage's append-only stats.jsonl (rank 0 only under torchrun/srun)."""
        if not self.is_main:
            return
        record.setdefault("time", time.time())
        append_jsonl(self.stage_dir / "stats.jsonl", record)

    def stage_path(self, stage: str) -> Path:
        return self.run_dir / stage

    def record_input(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_file():
            self.inputs[str(path)] = sha256_file(path)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StageError(f"device '{spec}' requested but CUDA is not available; use device=cpu or device=auto")
    return device


def run_dir_for(cfg: DictConfig) -> Path:
    """`<runs_root>/<name>`; a name that would lead outside the runs root stops with a one-line error."""
    from replication.utils.paths import contained

    contained(cfg.runs_root, cfg.name, what="run folder")
    return Path(cfg.runs_root) / cfg.name


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    return to_container(value) if isinstance(value, DictConfig) else (OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value)


def _upstream_ids(stage: str, cfg: DictConfig) -> dict[str, Any]:
    """The content ids of `stage`'s upstream stages: what their files hold, not when they ran. A stage whose rerun
    re-made identical files (a forced prepare of the same data) leaves everything downstream valid; one that made
    other files invalidates it."""
    run_dir = run_dir_for(cfg)
    out = {}
    for up in STAGE_DEPS[stage][1]:
        done = run_dir / up / DONE_FILE
        out[f"upstream:{up}"] = stage_content_id(read_json(done)) if done.exists() else None
    return out


def stage_content_id(record: dict[str, Any]) -> str | None:
    """A finished stage's content id (its done.json record)."""
    return record.get("content_id")


# Where things are on this machine, not what they are: left out of fingerprints, so that a runs folder that is moved
# (or a data folder mounted elsewhere) keeps its finished stages. A different raw dataset placed at the same
# name is not noticed by a fingerprint either way: `force=[prepare]` re-prepares it.
LOCATION_KEYS = {"dataset": ("root", "prepared_dir", "num_workers"), "metrics": ("reference_cache_dir",)}


def _fingerprint_value(cfg: DictConfig, key: str) -> Any:
    value = _select(cfg, key)
    if key in LOCATION_KEYS and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in LOCATION_KEYS[key]}
    return value


def fingerprint(stage: str, cfg: DictConfig) -> str:
    keys, _ = STAGE_DEPS[stage]
    parts: dict[str, Any] = {"stage": stage, "config": {k: _fingerprint_value(cfg, k) for k in keys}}
    parts.update(_upstream_ids(stage, cfg))
    return sha256_json(parts)


def resume_key(stage: str, cfg: DictConfig, trajectory: dict[str, Any]) -> str:
    """What a training stage's full-state checkpoint must have been written for to be resumed: the settings that
    decide the training trajectory (`trajectory`, chosen by the stage) and the content ids of its inputs. Settings
    that may change across a resume (step count, logging, checkpoint cadence, speed levers) stay out of it."""
    return sha256_json({"stage": stage, "trajectory": trajectory, **_upstream_ids(stage, cfg)})


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
    for up in STAGE_DEPS[stage][1]:
        done = run_dir / up / DONE_FILE
        if not done.exists():
            continue
        record = read_json(done)
        problems = verify_records(record.get("files", {}), full=True, root=cfg.runs_root)
        if problems:
            raise StageError(f"stage {stage}: the outputs of stage {up} are damaged ({'; '.join(problems[:3])}"
                             f"{'; ...' if len(problems) > 3 else ''}); they are not used. Re-make them: "
                             f"python -m replication.run experiment=... (or force=[{up}])")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(), "python": sys.version.split()[0],
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _setup_logging(stage_dir: Path, rank: int = 0) -> logging.Handler:
    stage_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(stage_dir / ("log.txt" if rank == 0 else f"log.rank{rank}.txt"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("replication")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    console_elsewhere = logging.getLogger().handlers  # Hydra's job logging already prints to the console
    if not console_elsewhere and not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                                         for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        root.addHandler(console)
    return handler


# Stages whose files are a cache of a computation from their inputs (latents of the frozen encoder): re-made, they
# may differ in the last float bits (other kernels, another device) while meaning the same thing, so their content
# id is what they were made from (config and upstream content ids), not their bytes. Their files are still
# recorded and verified like every other stage's. Training would otherwise restart whenever the cache is re-made.
DERIVED_STAGES = frozenset({"encode_latents"})

# Stages a run may link from `reuse_from` (their outputs live in their own folder; evaluate and report also write
# the run's metrics.json and report pages, so they always run for the new name)
REUSABLE_STAGES = ("prepare", "train_autoencoder", "encode_latents", "train_ldm", "sample")


def link_reusable(stage: str, cfg: DictConfig, root: Any) -> bool:
    """Link `runs/<reuse_from>/<stage>` as this run's stage folder when it is done with the fingerprint this run
    would compute (same config subset, same upstream results) and its outputs exist. True if linked."""
    if not root.reuse_from or root.reuse_from == root.name or stage not in REUSABLE_STAGES:
        return False
    run_dir = run_dir_for(cfg)
    stage_dir = run_dir / stage
    if stage_dir.exists() or stage_dir.is_symlink():
        return False
    from replication.utils.paths import contained

    contained(cfg.runs_root, root.reuse_from, what="reuse_from run folder")
    base = Path(cfg.runs_root) / root.reuse_from / stage
    if not _done_for(base / DONE_FILE, stage, cfg):
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    stage_dir.symlink_to(os.path.relpath(base.resolve(), run_dir.resolve()), target_is_directory=True)
    log.info("stage %s of %s: linked from run %s (same config and inputs)", stage, root.name, root.reuse_from)
    return True


# Stage bodies that use every process of a torchrun/srun job (DDP training; sampling shards split by rank). The
# others run on rank 0 while the other ranks wait for its result.
DISTRIBUTED_STAGES = frozenset({"train_ldm", "sample"})


def execute(stage: str, cfg: DictConfig, body: Callable[[StageContext], dict[str, Any]]) -> dict[str, Any]:
    """Run `body` for `stage` unless it is up to date; return its result dict (with `skipped`).

    Under torchrun or an srun step with several tasks, rank 0 decides whether the stage is up to date (every
    rank follows it), single-process stages run on rank 0 only while the others wait (an error there ends every
    rank with its message), and only rank 0 writes the manifest and done.json."""
    from replication.training.distributed import init_distributed

    typed = validate_config(cfg)
    root = typed.root
    run_dir = run_dir_for(cfg)
    stage_dir = run_dir / stage
    forced = "all" in root.force or stage in root.force
    device = resolve_device(root.device)
    dist = init_distributed(device)
    # rank 0 holds the run folder's lock from the skip decision to done.json: one writer per run folder. Every
    # process learns whether it got it, so that a refused job ends on all its processes at once.
    from replication.training.distributed import broadcast_from_main

    with contextlib.ExitStack() as lock:
        busy = None
        if dist.is_main:
            try:
                lock.enter_context(folder_lock(run_dir, stage))
            except FolderBusy as exc:
                busy = str(exc)
        busy = broadcast_from_main(busy, dist)
        if busy is not None:
            raise FolderBusy(busy)
        return _decide_and_run(stage, cfg, body, typed, run_dir, stage_dir, forced, device, dist)


def _decide_and_run(stage: str, cfg: DictConfig, body: Callable[[StageContext], dict[str, Any]], typed: TypedConfig,
                    run_dir: Path, stage_dir: Path, forced: bool, device: torch.device, dist: Any) -> dict[str, Any]:
    from replication.training.distributed import broadcast_from_main

    root = typed.root
    decision: Any = None
    if dist.is_main:
        try:
            if not forced:
                link_reusable(stage, cfg, root)
            up_to_date = not forced and is_up_to_date(stage, cfg)
            if not up_to_date and stage_dir.is_symlink():  # linked from reuse_from, now stale: never write there
                stage_dir.unlink()
                log.info("stage %s of %s: no longer linked to run %s; runs in its own folder", stage, root.name,
                         root.reuse_from)
            if not up_to_date:
                verify_upstream(stage, cfg)
            decision = up_to_date
        except StageError as exc:
            if not dist.enabled:
                raise
            decision = exc
    decision = broadcast_from_main(decision, dist)  # every process follows rank 0's decision
    if isinstance(decision, StageError):
        raise decision
    up_to_date = decision
    if up_to_date:
        result = dict(read_json(stage_dir / DONE_FILE).get("result", {}))
        result["skipped"] = True
        if dist.is_main:
            log.info("stage %s of %s is up to date; skipped (force=[%s] reruns it)", stage, root.name, stage)
        return result
    if dist.enabled and stage not in DISTRIBUTED_STAGES:
        return _on_rank0(stage, dist, stage_dir, lambda: _run_stage(stage, cfg, body, typed, run_dir, device, dist))
    if not dist.enabled:
        return _run_stage(stage, cfg, body, typed, run_dir, device, dist)
    # every rank runs the body; then they compare notes, so that one failed rank ends all of them (rather than
    # leaving the others waiting) and nobody moves on before rank 0 has written done.json
    from replication.training.distributed import gather_objects

    error, result = None, {}
    try:
        result = _run_stage(stage, cfg, body, typed, run_dir, device, dist)
    except BaseException as exc:
        error = exc
    try:
        errors = gather_objects(None if error is None else f"{type(error).__name__}: {error}", dist)
    except RuntimeError as exc:  # gloo: "Connection closed by peer"; the body's own collectives broke the same way
        own = "" if error is None else f" This process's own error: {type(error).__name__}: {first_line(error)}."
        raise _process_gone(f"stage {stage}: another process of this {dist.world_size}-process job is gone",
                            f"process {dist.rank} ends here.{own}", exc) from exc
    if error is not None:
        raise error
    failed = [(rank, msg) for rank, msg in enumerate(errors) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise StageError(f"stage {stage} failed on process {rank} of {dist.world_size}: {msg}")
    return result


def _process_gone(what: str, then: str, exc: BaseException) -> StageError:
    """The error of a process whose collective broke because a peer's process vanished (SIGKILL, out of memory)."""
    return StageError(f"{what} (killed, or out of memory?); {then} Finished stages are kept, and a rerun goes on "
                      f"from them. The collective said: {first_line(exc)}")


def _on_rank0(stage: str, dist: Any, stage_dir: Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Rank 0 runs the stage alone, then tells the others how it went. A process that vanishes (killed, out of
    memory) breaks that collective; each side then ends with a message that says so, not a gloo traceback."""
    from replication.training.distributed import broadcast_from_main

    if dist.is_main:
        error = None
        try:
            return run()
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            try:
                broadcast_from_main(error, dist)
            except RuntimeError as exc:  # gloo: "Connection closed by peer" when a waiting process is gone
                raise _process_gone(f"stage {stage} {'finished' if error is None else 'failed'} on rank 0, but "
                                    f"another process of this {dist.world_size}-process job is gone",
                                    "the job ends here.", exc) from exc
    log.info("stage %s: process %d waits for rank 0, which runs it alone", stage, dist.rank)
    try:
        error = broadcast_from_main(None, dist)
    except RuntimeError as exc:  # the same when rank 0's process is gone
        raise _process_gone(f"stage {stage}: rank 0 ended without a word while process {dist.rank} waited for it",
                            f"its log is {stage_dir / 'log.txt'}.", exc) from exc
    if error is not None:
        raise StageError(f"stage {stage} failed on rank 0 (see {stage_dir / 'log.txt'}): {error}")
    result = dict(read_json(stage_dir / DONE_FILE).get("result", {}))
    result.update(skipped=False, ran_on="rank 0")
    return result


def _run_stage(stage: str, cfg: DictConfig, body: Callable[[StageContext], dict[str, Any]], typed: TypedConfig,
               run_dir: Path, device: torch.device, dist: Any) -> dict[str, Any]:
    root = typed.root
    stage_dir = run_dir / stage
    handler = _setup_logging(stage_dir, dist.rank)
    if root.cpu_threads:
        torch.set_num_threads(root.cpu_threads)
    seed_everything(root.seed)  # weight initialisation and any library randomness repeat run to run
    ctx = StageContext(name=stage, cfg=cfg, typed=typed, run_dir=run_dir, stage_dir=stage_dir, device=device,
                       progress=root.progress and dist.is_main, is_main=dist.is_main)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    started = time.time()
    log.info("stage %s of %s: start (device %s%s)", stage, root.name, device,
             f", process {dist.rank} of {dist.world_size}" if dist.enabled else "")
    try:
        result = body(ctx)
    finally:
        logging.getLogger("replication").removeHandler(handler)
        handler.close()
    elapsed = time.time() - started
    outputs = [str(p) for p in result.pop("outputs", [])]
    if dist.is_main:
        manifest = {
            "stage": stage,
            "experiment": root.name,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "seconds": round(elapsed, 3),
            "git_commit": _git_commit(),
            "packages": _package_versions(),
            "device": _device_info(device),
            "processes": dist.world_size,
            "seeds": {"seed": root.seed, "sampler_seed": _select(cfg, "sampler.seed")},
            "inputs": ctx.inputs,
            "outputs": outputs,
            "config_choices": dict(root.choices),
            "config": {k: _select(cfg, k) for k in STAGE_DEPS[stage][0]},
            "argv": sys.argv,
        }
        files = content_records(outputs, root=root.runs_root)
        upstream = _upstream_ids(stage, cfg)
        if stage in DERIVED_STAGES:  # identified by what it was made from (see DERIVED_STAGES)
            files_for_id: dict[str, Any] = {}
            upstream = {"derived_from": fingerprint(stage, cfg)}
        else:
            files_for_id = files
        manifest["outputs_sha256"] = {path: rec["sha256"] for path, rec in files.items()}
        atomic_write_json(stage_dir / MANIFEST_FILE, manifest)
        atomic_write_json(stage_dir / DONE_FILE, {"fingerprint": fingerprint(stage, cfg), "run_id": uuid.uuid4().hex,
                                                  "content_id": content_id(files_for_id, upstream, root.runs_root),
                                                  "outputs": outputs,
                                                  "files": files, "result": result})
        ctx.stats(event="stage_done", seconds=elapsed)
        log.info("stage %s of %s: done in %.1f s", stage, root.name, elapsed)
    result["skipped"] = False
    result["seconds"] = elapsed
    return result


def compose(overrides: Iterable[str] = ()) -> DictConfig:
    """Compose the config as the command line would (for notebooks and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def hydra_entry(run: Callable[[DictConfig], dict[str, Any]]) -> Callable[[], None]:
    """A thin `@hydra.main` wrapper around `run(cfg)` (lightning-hydra-template habit)."""
    import hydra

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        from replication.training.distributed import shutdown_distributed

        _record_choices(cfg)
        try:
            result = run(cfg)
        except user_errors() as exc:  # a clear message, not a traceback (HYDRA_FULL_ERROR=1 shows it)
            # every rank raises these together (execute() compares notes first), so all are past their collectives;
            # an unexpected error keeps its group, since destroying it could wait on a rank still in a collective
            shutdown_distributed()
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error ({type(exc).__name__}): {exc}", file=sys.stderr)
            sys.exit(2)
        shutdown_distributed()
        print(json_summary(result))

    def entry() -> None:
        # Hydra makes its run folder from `runs_root` and `name` before `run` is called, so a bad name or an
        # unwritable root is reported here first, as the one line `run` would give
        from replication.preflight import check_cli_overrides

        error = check_cli_overrides(sys.argv[1:])
        if error is not None:
            print(error, file=sys.stderr)
            sys.exit(2)
        _main()

    return entry


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "fix your input" (config, data, weights, checkpoints), reported without a traceback."""
    from replication.config import ConfigError
    from replication.data.download import ChecksumError, DownloadError, ManualDownloadRequired, UnsafeArchiveError
    from replication.training.signals import TrainingDiverged
    from replication.utils.io import ArtifactError

    errors: list[type[BaseException]] = [ConfigError, StageError, ArtifactError, FolderBusy, DownloadError, ChecksumError,
                                         ManualDownloadRequired, UnsafeArchiveError, TrainingDiverged]
    try:
        from replication.metrics.features import StandinNotAllowedError, WeightsNotFoundError
        from replication.metrics.reference import ReferenceMismatchError

        errors += [WeightsNotFoundError, StandinNotAllowedError, ReferenceMismatchError]
    except ImportError:
        pass
    return tuple(errors)


def _record_choices(cfg: DictConfig) -> None:
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    except Exception:  # not inside a Hydra app
        return
    with_struct = OmegaConf.is_struct(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.choices = {k: str(v) for k, v in choices.items() if k.split("/")[0] in GROUPS + ("experiment",)}
    OmegaConf.set_struct(cfg, with_struct)


def json_summary(result: dict[str, Any]) -> str:
    import json

    return json.dumps(result, indent=2, sort_keys=True, default=str)
