"""The command line of a stage (`python -m replication.stages.<stage> experiment=NAME`) and of the whole run:
`hydra_entry` composes the config from experiments/, checks it before Hydra makes its run folder, and ends a
run that failed on bad input with one line (`user_errors`) instead of a traceback; `compose` gives the same
config without a command line."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from replication.config import GROUPS, ConfigError
from replication.stages.context import StageError
from replication.stages.lock import FolderBusy

CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments"


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
    try:  # text-to-image: the user-supplied vocabulary and image-caption data
        from replication.data.captioned import CaptionDataError
        from replication.data.tokenizer import VocabularyError, VocabularyNotFoundError

        errors += [VocabularyNotFoundError, VocabularyError, CaptionDataError]
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
    return json.dumps(result, indent=2, sort_keys=True, default=str)
