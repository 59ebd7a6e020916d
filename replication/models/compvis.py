"""Read the original CompVis/latent-diffusion checkpoints (Lightning `.ckpt`) as plain tensors, never running their code.

`load_compvis_checkpoint` tries `torch.load(weights_only=True)` first. Lightning checkpoints of the release
also pickle non-tensor objects (callback states keyed by class, hparams, numpy scalars), which the
weights-only reader refuses; for those a restricted unpickler is used: tensors, storages and a handful of
harmless builtins are rebuilt, objects of known bookkeeping packages (pytorch_lightning, omegaconf, numpy,
...) become inert placeholders that never run any code, and every other global (os.system, builtins.eval,
...) aborts the load with `UnsafeCheckpointError`. Only the `state_dict` tensors are returned.

CLI: python -m replication.models.compvis convert IN.ckpt OUT_DIR --kind ldm|autoencoder [--use-ema]
"""
from __future__ import annotations

import argparse
import io
import pickle
import sys
import types
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..utils.io import (ArtifactError, atomic_write_json, check_free_space, save_tensors, sha256_file,
                        unpickling_failure)
from replication.utils.state import CheckpointMismatchError, check_fits  # noqa: F401 (re-exported)

from .ema import shadow_name

# Key prefixes of `LatentDiffusion.state_dict()` in the release [code: ldm/models/diffusion/ddpm.py].
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
EMA_UNET_ROOT = "diffusion_model."  # LitEma(self.model) sees DiffusionWrapper, whose child is `diffusion_model`
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
EMA_META_KEYS = ("decay", "num_updates")
AUTOENCODER_LOSS_PREFIX = "loss."  # LPIPS + discriminator of the first-stage training module

# Result keys of `split_ldm_state`.
UNET = "unet"
FIRST_STAGE = "first_stage"
EMA_UNET = "ema_unet"
EMA_META = "ema_meta"
BUFFERS = "buffers"
COND_STAGE = "cond_stage"
OTHER = "other"

# Output file names of the converter.
UNET_FILE = "unet.safetensors"
EMA_UNET_FILE = "ema_unet.safetensors"
AUTOENCODER_FILE = "autoencoder.safetensors"
AUTOENCODER_LOSS_FILE = "autoencoder_loss.safetensors"
COND_STAGE_FILE = "cond_stage.safetensors"
CONVERSION_FILE = "conversion.json"

# Globals the restricted reader rebuilds for real: tensor/storage reconstruction and inert containers.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.nn.parameter", "Parameter"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),
}
# Packages whose pickled objects (never their code) may appear in a release checkpoint beside the weights.
_PLACEHOLDER_PACKAGES = (
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "omegaconf",
    "numpy",
    "pathlib",
    "argparse",
    "ldm",
    "taming",
    "main",
    "typing",
    "enum",
    "datetime",
)


class UnsafeCheckpointError(ArtifactError):
    """The checkpoint references code outside the allow-list; nothing from it was executed."""



class _Placeholder:
    """Inert stand-in for a pickled object of a bookkeeping package: accepts any state, runs nothing."""

    origin = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.__dict__.setdefault("list", []).extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self.origin}>"


def _is_tensor_global(module: str, name: str) -> bool:
    return (module, name) in _ALLOWED_GLOBALS or (module == "torch" and name.endswith("Storage")) or (
        module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
    )


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if _is_tensor_global(module, name):
            return super().find_class(module, name)
        root = module.split(".", 1)[0]
        if root in _PLACEHOLDER_PACKAGES:
            return type(name, (_Placeholder,), {"origin": f"{module}.{name}"})
        raise UnsafeCheckpointError(
            f"refusing to unpickle global {module}.{name}: it is neither a tensor type nor an object of a known "
            f"bookkeeping package ({', '.join(_PLACEHOLDER_PACKAGES)}); the file may run code when loaded"
        )


def _restricted_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("replication_restricted_pickle")
    mod.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]

    def load(fh: io.IOBase, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(fh, **kwargs).load()

    mod.load = load  # type: ignore[attr-defined]
    mod.__name__ = "pickle"  # torch.load only checks this name for the legacy format
    return mod


def _read_checkpoint_object(path: Path) -> Any:
    # Memory-map zip-format files (every torch>=1.6 save) so multi-GB checkpoints are not read twice.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as weights_only_error:  # UnpicklingError for foreign globals; retried below
        first_error = weights_only_error
    try:  # not plain unpickling: _RestrictedUnpickler allows tensor types only, inert placeholders for Lightning
        return torch.load(  # bookkeeping objects, and refuses every other global (no code can run)
            path, map_location="cpu", weights_only=False, mmap=mmap, pickle_module=_restricted_pickle_module()
        )
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{path}: {exc}") from None
    except Exception as exc:
        raise ArtifactError(
            f"cannot read {path}: the weights-only reader failed ({unpickling_failure(first_error)}) and so did "
            f"the restricted reader ({unpickling_failure(exc)}); is it a PyTorch checkpoint?"
        ) from exc


def load_compvis_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat `state_dict` of an original `.ckpt` (or of a bare tensor dict), tensors on CPU."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist")
    obj = _read_checkpoint_object(path)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        sd = obj["state_dict"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        keys = list(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
        raise ArtifactError(f"{path} holds no 'state_dict' and is not a tensor dict (top level: {keys})")
    if not isinstance(sd, Mapping):
        raise ArtifactError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a mapping")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ArtifactError(f"{path}: state_dict entries that are not tensors: {bad[:20]}")
    return {k: v.detach() if isinstance(v, nn.Parameter) else v for k, v in sd.items()}


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def ema_to_unet_names(ema_entries: Mapping[str, torch.Tensor], unet_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Map LitEma shadow names (dots of 'diffusion_model.<name>' removed) back to U-Net parameter names."""
    lookup: dict[str, str] = {}
    for name in unet_names:
        s = shadow_name(EMA_UNET_ROOT + name)
        if s in lookup:
            raise CheckpointMismatchError(f"U-Net names {lookup[s]!r} and {name!r} give the same EMA name {s!r}")
        lookup[s] = name
    unknown = sorted(k for k in ema_entries if k not in lookup)
    if unknown:
        raise CheckpointMismatchError(
            f"{len(unknown)} EMA entries match no U-Net parameter name (first: {unknown[:10]})"
        )
    return {lookup[k]: v for k, v in ema_entries.items()}


def split_ldm_state(sd: Mapping[str, torch.Tensor], unet_names: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Split a LatentDiffusion state dict into its parts, each with the sub-module's own key names.

    Returns {unet, ema_unet, ema_meta, first_stage, cond_stage, buffers, other}. `ema_unet` uses U-Net
    names; `unet_names` (default: the checkpoint's own `model.diffusion_model.*` names) resolves them.
    `buffers` are the top-level tensors (betas, alphas_cumprod, ..., scale_factor).
    """
    out: dict[str, dict[str, torch.Tensor]] = {
        UNET: _strip(sd, UNET_PREFIX),
        FIRST_STAGE: _strip(sd, FIRST_STAGE_PREFIX),
        COND_STAGE: _strip(sd, COND_STAGE_PREFIX),
        BUFFERS: {k: v for k, v in sd.items() if "." not in k},
    }
    ema_all = _strip(sd, EMA_PREFIX)
    out[EMA_META] = {k: v for k, v in ema_all.items() if k in EMA_META_KEYS}
    ema_shadows = {k: v for k, v in ema_all.items() if k not in EMA_META_KEYS}
    names = list(unet_names) if unet_names is not None else list(out[UNET])
    if ema_shadows and not names:
        raise CheckpointMismatchError("checkpoint has model_ema.* entries but no U-Net names to map them to")
    out[EMA_UNET] = ema_to_unet_names(ema_shadows, names) if ema_shadows else {}
    known = (UNET_PREFIX, EMA_PREFIX, FIRST_STAGE_PREFIX, COND_STAGE_PREFIX)
    out[OTHER] = {k: v for k, v in sd.items() if "." in k and not k.startswith(known)}
    return out


def load_released_denoiser(sd: Mapping[str, torch.Tensor], denoiser: nn.Module, betas: torch.Tensor,
                           default_scale_factor: float, what: str, use_ema: bool = True,
                           require_ema: bool = False) -> tuple[float, bool]:
    """Load a released LDM checkpoint's U-Net (EMA or raw) and conditioning weights into `denoiser` (a U-Net, or a
    conditional wrapper holding `diffusion_model` and `cond_stage_model`), names and shapes checked; refuse a
    checkpoint trained with another noise schedule than `betas`. Returns (scale_factor, EMA weights used): the
    checkpoint's stored scale_factor where it has one, else `default_scale_factor`. Without EMA tensors the raw
    U-Net is used, unless `require_ema`."""
    unet = getattr(denoiser, "diffusion_model", denoiser)
    parts = split_ldm_state(sd, unet_names=list(unet.state_dict()))
    if not parts[UNET] and not parts[EMA_UNET]:
        raise CheckpointMismatchError(f"{what} holds no {UNET_PREFIX}* tensors: not an LDM checkpoint (a first stage? "
                                      "then name a first-stage experiment)")
    if use_ema and require_ema and not parts[EMA_UNET]:
        raise CheckpointMismatchError(f"{what} holds no EMA weights ({EMA_PREFIX}*): load it with ema=False")
    used_ema = bool(use_ema and parts[EMA_UNET])
    load_into(unet, parts[EMA_UNET] if used_ema else parts[UNET], what=f"the U-Net of {what}")
    cond_stage = getattr(denoiser, "cond_stage_model", None)
    if cond_stage is not None and any(True for _ in cond_stage.state_dict()):
        load_into(cond_stage, parts[COND_STAGE], what=f"the conditioning model of {what}")
    elif parts[COND_STAGE]:
        raise CheckpointMismatchError(f"{what} holds a conditioning model ({len(parts[COND_STAGE])} cond_stage_model.* "
                                      "tensors) but the experiment builds an unconditional one: pick its experiment")
    buffers = parts[BUFFERS]
    if "betas" in buffers:
        ours, theirs = betas.double().cpu(), buffers["betas"].double().cpu()
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-6, atol=1e-9):
            raise CheckpointMismatchError(
                f"{what} was trained with another noise schedule ({theirs.numel()} steps, beta "
                f"{theirs[0].item():.6g}..{theirs[-1].item():.6g}) than the experiment's diffusion config "
                f"({ours.numel()} steps, {ours[0].item():.6g}..{ours[-1].item():.6g}); pick the diffusion config of "
                "that model")
    scale = float(buffers["scale_factor"]) if "scale_factor" in buffers else float(default_scale_factor)
    return scale, used_ema


def split_autoencoder_state(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """First-stage weights under the autoencoder's own names: from a first-stage checkpoint (dropping the
    `loss.*` LPIPS/discriminator tensors) or from the `first_stage_model.*` part of an LDM checkpoint."""
    if any(k.startswith(FIRST_STAGE_PREFIX) for k in sd):
        out = _strip(sd, FIRST_STAGE_PREFIX)
    else:
        out = {k: v for k, v in sd.items() if not k.startswith(AUTOENCODER_LOSS_PREFIX)}
    if not out:
        raise ArtifactError("no autoencoder tensors found (neither first_stage_model.* nor non-loss.* keys)")
    return out


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], what: str = "module", assign: bool = False) -> None:
    """Strict load; any missing, unexpected or shape-mismatched key raises ONE error listing all of them.

    `assign=True` replaces the module's tensors by the given ones (e.g. into a module built on the meta device).
    """
    check_fits(module.state_dict(), state, f"state dict does not fit {what}")
    module.load_state_dict(dict(state), strict=True, assign=assign)


def _scalar_or_list(t: torch.Tensor) -> Any:
    t = t.detach().cpu()
    return t.item() if t.numel() == 1 else t.double().tolist()


def convert(
    ckpt: str | Path, out_dir: str | Path, kind: str, use_ema: bool = False, unet_config: str | Path | None = None
) -> dict[str, Any]:
    """Write the parts of an original checkpoint as safetensors files plus `conversion.json`; return that record."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    sd = load_compvis_checkpoint(ckpt)
    check_free_space(out_dir, 2 * sum(v.numel() * v.element_size() for v in sd.values()), what="converted checkpoint")
    meta = {"source": ckpt.name, "source_sha256": sha256_file(ckpt)}
    record: dict[str, Any] = {"kind": kind, **meta, "files": {}}
    if kind == "autoencoder":
        loss = _strip(sd, AUTOENCODER_LOSS_PREFIX)
        ae = split_autoencoder_state(sd)
        save_tensors(out_dir / AUTOENCODER_FILE, ae, meta)
        record["files"][AUTOENCODER_FILE] = len(ae)
        if loss:
            save_tensors(out_dir / AUTOENCODER_LOSS_FILE, loss, meta)
            record["files"][AUTOENCODER_LOSS_FILE] = len(loss)
    elif kind == "ldm":
        parts = split_ldm_state(sd)
        if not parts[UNET] and not parts[EMA_UNET]:
            raise ArtifactError(f"{ckpt} has no {UNET_PREFIX}* or {EMA_PREFIX}* tensors: is it an LDM checkpoint?")
        if use_ema and not parts[EMA_UNET]:
            raise ArtifactError(f"--use-ema given but {ckpt} holds no {EMA_PREFIX}* weights")
        unet = parts[EMA_UNET] if use_ema else parts[UNET]
        if unet_config is not None:
            _check_unet_config(unet, unet_config)
        save_tensors(out_dir / UNET_FILE, unet, {**meta, "weights": "ema" if use_ema else "raw"})
        record["files"][UNET_FILE] = len(unet)
        if parts[EMA_UNET]:
            save_tensors(out_dir / EMA_UNET_FILE, parts[EMA_UNET], meta)
            record["files"][EMA_UNET_FILE] = len(parts[EMA_UNET])
        for name, key in ((AUTOENCODER_FILE, FIRST_STAGE), (COND_STAGE_FILE, COND_STAGE)):
            if parts[key]:
                save_tensors(out_dir / name, parts[key], meta)
                record["files"][name] = len(parts[key])
        record["unet_weights"] = "ema" if use_ema else "raw"
        record["ema"] = {k: _scalar_or_list(v) for k, v in parts[EMA_META].items()}
        record["scale_factor"] = _scalar_or_list(parts[BUFFERS]["scale_factor"]) if "scale_factor" in parts[BUFFERS] else None
        record["buffers"] = {k: _scalar_or_list(v) for k, v in parts[BUFFERS].items()}
        record["unassigned_keys"] = sorted(parts[OTHER])
    else:
        raise ValueError(f"unknown --kind {kind!r}; expected 'ldm' or 'autoencoder'")
    atomic_write_json(out_dir / CONVERSION_FILE, record)
    return record


def _check_unet_config(unet_state: Mapping[str, torch.Tensor], config_path: str | Path) -> None:
    from omegaconf import OmegaConf

    from .unet_config import build_unet

    with torch.device("meta"):
        model = build_unet(OmegaConf.load(config_path))
    load_into(model, {k: v.to("meta") for k, v in unet_state.items()}, what=f"UNetModel from {config_path}", assign=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication.models.compvis", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="original .ckpt -> safetensors + conversion.json")
    conv.add_argument("ckpt", type=Path)
    conv.add_argument("out_dir", type=Path)
    conv.add_argument("--kind", choices=("ldm", "autoencoder"), required=True)
    conv.add_argument("--use-ema", action="store_true", help="write the EMA U-Net weights as unet.safetensors")
    conv.add_argument("--unet-config", type=Path, default=None, help="experiments/unet/*.yaml to check the U-Net keys against")
    args = parser.parse_args(argv)
    try:
        record = convert(args.ckpt, args.out_dir, args.kind, use_ema=args.use_ema, unet_config=args.unet_config)
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(record['files'])} and {CONVERSION_FILE} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
