"""Strict configuration: every config group is checked against a typed schema, so a mistyped or unknown
key fails with its name instead of being silently ignored (STYLE.md habit 9)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from replication.data.config import DatasetConfig, validate_dataset_cfg
from replication.diffusion.config import DiffusionConfig, SamplerConfig, validate_diffusion_cfg, validate_sampler_cfg
from replication.metrics.config import MetricsConfig, validate_metrics_cfg
from replication.models.autoencoder_config import AutoencoderConfig, validate_autoencoder_cfg
from replication.models.text_encoder import TextEncoderConfig
from replication.models.unet_config import UNetConfig, validate_unet_cfg
from replication.training.classifier_config import (ClassifierGroupConfig, check_classifier_fits,
                                                    validate_classifier_group_cfg)
from replication.utils.paths import PLAIN_NAME_RULE, is_plain_name
from replication.utils.schema import ConfigError, check_finite, check_range, merge_into_schema


class ExperimentKind(str, enum.Enum):
    # member names are lower case so YAML files can say `kind: ldm` (OmegaConf matches enum names)
    ldm = "ldm"  # prepare -> autoencoder -> latents -> LDM -> samples -> metrics -> report
    autoencoder = "autoencoder"  # prepare -> autoencoder -> reconstruction metrics -> report


# torch.compile's modes (torch._inductor.list_mode_options; "lite" left out, it is an opt-in subset). null in a
# config is inductor's default. "reduce-overhead" and "max-autotune" add CUDA graphs (replayed kernel launches).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: Optional[str], key: str) -> Optional[str]:
    """`mode` if torch.compile accepts it (None: inductor's default); ConfigError naming `key` otherwise.
    Checked when the config is read, not when a GPU run first compiles (CPU runs never compile the sampler)."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ConfigError(f"{key} must be null or one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    return mode


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast with fp32 master weights


STAGES = ("prepare", "train_autoencoder", "encode_latents", "train_ldm", "train_classifier", "sample", "evaluate",
          "report")
AUTOENCODER_STAGES = ("prepare", "train_autoencoder", "evaluate", "report")


@dataclass
class TrainerConfig:
    """LDM training loop. Defaults follow the original release (main.py / ddpm.py); see PROTOCOL.md §3."""

    pretrained: Optional[str] = None  # an original CompVis LDM .ckpt: import its (EMA) U-Net instead of training
    pretrained_use_ema: bool = True
    steps: int = 1000
    batch_size: int = 8  # per process
    base_lr: float = 2.0e-6
    scale_lr: bool = True  # original main.py: lr = accumulate * ngpu * batch_size * base_lr
    accumulate_grad_batches: int = 1  # micro-batches of batch_size per optimizer step (Lightning semantics)
    # the release's LitEma updates after every micro-batch (Lightning's on_train_batch_end); false: per step
    ema_every_micro_batch: bool = True
    # resume a checkpoint of another process count (re-seeded streams; not bit-identical to an uninterrupted run)
    allow_world_size_change: bool = False
    weight_decay: float = 0.01  # torch AdamW default, as the original (not stated in the paper)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    use_ema: bool = True
    ema_decay: float = 0.9999
    grad_clip: Optional[float] = None  # the original does not clip
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last_ckpts: int = 2
    precision: Precision = Precision.fp32
    compile: bool = False
    compile_mode: Optional[str] = None  # with compile: one of COMPILE_MODES, e.g. "reduce-overhead" (CUDA graphs)
    channels_last: bool = False
    fused_adam: bool = False
    gradient_checkpointing: bool = False
    use_latent_cache: bool = True  # train on cached moments instead of encoding every batch
    pin_memory: bool = False  # page-locked, non-blocking input copies (CUDA only)
    eval_every: int = 0  # >0: FID-vs-train-steps curve points (Fig. 6) every this many steps
    eval_num_samples: int = 0
    source: str = ""


@dataclass
class PaperRef:
    """Keys into reports/paper/results.csv (or autoencoders.csv `name` for autoencoder experiments)."""

    table: Optional[str] = None
    dataset: Optional[str] = None
    method: Optional[str] = None
    name: Optional[str] = None  # autoencoders.csv
    value: Optional[float] = None  # the headline number, repeated here for humans; the report reads the CSV


@dataclass
class PaperProtocol:
    """The paper's evaluation settings for this row; the report flags every deviation from them."""

    num_samples: Optional[int] = None
    sampler: Optional[str] = None
    steps: Optional[int] = None
    eta: Optional[float] = None
    guidance_scale: Optional[float] = None
    classifier_scale: Optional[float] = None  # classifier guidance (Tab. 10 LDM-8-G: 10)
    feature_extractor: Optional[str] = None
    pr_protocol: Optional[str] = None
    reference_set: Optional[str] = None
    train_steps: Optional[int] = None
    train_global_batch: Optional[int] = None  # Tab. 12-15 batch size (all processes, all accumulated micro-batches)
    train_lr: Optional[float] = None  # Tab. 12-15 learning rate (the effective one)
    ema: Optional[bool] = None


class ConditioningKind(str, enum.Enum):
    none = "none"  # unconditional (Table 1)
    class_label = "class_label"  # U-Net `num_classes`: label embedding added to the time embedding
    class_embed = "class_embed"  # cIN LDMs (cin256, Tab.13): ClassEmbedder -> cross-attention context
    # concat conditioning (release conditioning_key concat, models/concat_conditioning.py): the U-Net input is
    # z_t joined with an image-shaped condition
    lowres = "lowres"  # super-resolution (bsr_sr, Tab. 5): the low-resolution image in [-1, 1]
    masked_image = "masked_image"  # inpainting (inpainting_big, Tab. 7): first-stage code of the masked image + mask
    # text-to-image (txt2img-1p4B, Tab. 2): captions -> WordPiece token ids -> the release's BERTEmbedder (trained
    # jointly) -> cross-attention context; the unconditional input of guidance is the empty prompt ""
    text = "text"


CONCAT_KINDS = (ConditioningKind.lowres, ConditioningKind.masked_image)
CONCAT_TASK = {ConditioningKind.lowres: "superres", ConditioningKind.masked_image: "inpainting"}


@dataclass
class ConditioningConfig:
    kind: ConditioningKind = ConditioningKind.none
    num_classes: int = 1000  # real classes; labels drawn for sampling are i % num_classes
    n_embed_classes: int = 1001  # embedding rows (class_embed); index 1000 = null label (original cin256-v2)
    # concat tasks (data/conditions.py). lowres: how the low-resolution input is made from the high-resolution
    # image (the release's ImageNetSR options; Tab. 5 says "bicubic with anti-aliasing") and the scale factor;
    # masked_image: LaMa's mask configuration (thick, thin, medium; the paper does not say which)
    degradation: str = "pil_bicubic"
    sr_factor: int = 4
    mask_config: str = "thick"
    eval_seed: int = 0  # the fixed low-resolution inputs / masks of the evaluation images
    # text: the user-supplied bert-base-uncased vocab.txt (nothing is downloaded; the smoke run's prepare stage
    # writes one for its captions), the encoder's sizes (models/text_encoder.py TextEncoderConfig: n_embed,
    # n_layer, vocab_size, max_seq_len 77, embedding_dropout) and the training caption dropout to "" that teaches
    # the unconditional model for guidance. Its rate is not in the paper or the release (PROTOCOL.md 2): a
    # recorded choice.
    vocab_path: Optional[str] = None
    text_encoder: Optional[TextEncoderConfig] = None
    caption_drop_prob: float = 0.0
    # text, built-in captioned data: prompts whose samples (probe_samples each, and as many for "") the evaluation
    # compares on the colours the prompt names, to show whether the captions steer the samples
    probe_prompts: list[str] = field(default_factory=list)
    probe_samples: int = 0


# the conditioning keys only the text kind reads: left out of the other kinds' training and sample keys, which
# therefore stay what they were before these keys existed
TEXT_ONLY_KEYS = ("vocab_path", "text_encoder", "caption_drop_prob", "probe_prompts", "probe_samples")


def conditioning_record(cond: ConditioningConfig) -> dict[str, Any]:
    """The conditioning settings as a plain dict for training resume keys and sample keys: every key of a text
    experiment, and without the text-only keys for the other kinds."""
    record = to_container(cond)
    if cond.kind is not ConditioningKind.text:
        record = {k: v for k, v in record.items() if k not in TEXT_ONLY_KEYS}
    return record


@dataclass
class SamplingSpeedConfig:
    """Speed levers of the sample stage, applied on CUDA only. channels_last and compile compute the
    same function; bf16 moves samples by about 1e-2 relative, so it stays off unless asked for."""

    precision: Precision = Precision.fp32
    channels_last: bool = True
    compile: bool = True
    compile_mode: Optional[str] = None  # e.g. "reduce-overhead" (CUDA graphs)


@dataclass
class CurvesConfig:
    """Extra evaluation series for the report's figures (paper Figs. 6-7)."""

    ddim_steps: list[int] = field(default_factory=list)  # Fig. 7: FID vs DDIM steps and throughput
    num_samples: int = 0  # samples per curve point (the paper used 5k)


@dataclass
class RootConfig:
    name: str = "smoke"
    kind: ExperimentKind = ExperimentKind.ldm
    seed: int = 0
    comparable: bool = True  # false for the smoke run: the report marks it "not comparable"
    not_comparable_reason: Optional[str] = None
    data_root: str = "data"
    runs_root: str = "runs"
    reports_dir: str = "runs/reports"  # the YAML default is ${runs_root}/reports: generated output stays untracked
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cpu_threads: Optional[int] = None  # torch.set_num_threads on the CPU (1 is fastest for the tiny smoke models)
    progress: bool = True
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    force: list[str] = field(default_factory=list)  # stage names to rerun even if up to date, or ["all"]
    # "change one thing": the name of an earlier run under the same runs_root whose stages this run links instead
    # of recomputing, as long as their config subset and upstream results are the same (prepare .. sample)
    reuse_from: Optional[str] = None
    paper: PaperRef = field(default_factory=PaperRef)
    paper_protocol: PaperProtocol = field(default_factory=PaperProtocol)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    sampling_speed: SamplingSpeedConfig = field(default_factory=SamplingSpeedConfig)
    sample_shard_size: int = 1000  # samples per shard file; resumable sampling redoes only missing shards
    curves: CurvesConfig = field(default_factory=CurvesConfig)
    choices: dict[str, str] = field(default_factory=dict)  # config-group choices, recorded for the manifest


def validate_trainer_cfg(cfg: Any) -> TrainerConfig:
    trainer = merge_into_schema(TrainerConfig, cfg, "trainer")
    for key in ("steps", "batch_size", "accumulate_grad_batches", "log_every", "ckpt_every", "keep_last_ckpts"):
        if getattr(trainer, key) < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {getattr(trainer, key)}")
    for key in ("eval_every", "eval_num_samples"):
        check_range(getattr(trainer, key), f"trainer.{key}", low=0)
    check_range(trainer.ema_decay, "trainer.ema_decay", low=0.0, high=1.0)
    check_range(trainer.base_lr, "trainer.base_lr", low=0.0, low_open=True)
    check_range(trainer.weight_decay, "trainer.weight_decay", low=0.0)
    check_adam_betas(trainer.adam_betas, "trainer.adam_betas")
    if trainer.grad_clip is not None:
        check_range(trainer.grad_clip, "trainer.grad_clip", low=0.0, low_open=True)
    check_compile_mode(trainer.compile_mode, "trainer.compile_mode")
    return trainer


def check_adam_betas(betas: list[float], key: str) -> None:
    """Adam's two decay rates, each in [0, 1) (torch.optim.Adam rejects anything else, but only at the first step)."""
    if len(betas) != 2:
        raise ConfigError(f"{key} must have two entries, got {betas}")
    for i, beta in enumerate(betas):
        check_range(beta, f"{key}[{i}]", low=0.0, high=1.0, high_open=True)


GROUPS = ("dataset", "autoencoder", "unet", "diffusion", "sampler", "metrics", "trainer", "classifier")
# groups a config may leave out: a config without a classifier group (a run folder's config.yaml written without
# one, a hand-made config) has no classifier guidance, as with classifier=none
OPTIONAL_GROUPS = frozenset({"classifier"})

# group -> the function validating that group against its schema and returning the typed object
GROUP_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "dataset": validate_dataset_cfg,
    "autoencoder": validate_autoencoder_cfg,
    "unet": validate_unet_cfg,
    "diffusion": validate_diffusion_cfg,
    "sampler": validate_sampler_cfg,
    "metrics": validate_metrics_cfg,
    "trainer": validate_trainer_cfg,
    "classifier": validate_classifier_group_cfg,
}
# the groups whose schema lives in this module: their messages name the full key (trainer.steps); the message of
# any other group's validator is prefixed with the group it came from
ROOT_SCHEMA_GROUPS = frozenset({"trainer"})


def _check_root(root: RootConfig) -> None:
    """Names that become folders are plain identifiers; counts and sizes are in range."""
    for key in ("name", "reuse_from"):
        value = getattr(root, key)
        if value is not None and not is_plain_name(value):
            raise ConfigError(f"{key}={value!r} is not {PLAIN_NAME_RULE} (it names a folder under runs_root)")
    for key in ("data_root", "runs_root", "reports_dir"):
        if not getattr(root, key).strip():
            raise ConfigError(f"{key} must be a folder path, got an empty string")
    if root.cpu_threads is not None:
        check_range(root.cpu_threads, "cpu_threads", low=1)
    check_range(root.sample_shard_size, "sample_shard_size", low=1)
    check_range(root.curves.num_samples, "curves.num_samples", low=0)
    for i, steps in enumerate(root.curves.ddim_steps):
        check_range(steps, f"curves.ddim_steps[{i}]", low=1)
    check_range(root.conditioning.num_classes, "conditioning.num_classes", low=1)
    check_range(root.conditioning.n_embed_classes, "conditioning.n_embed_classes", low=1)
    proto = root.paper_protocol
    for key, low, high in (("eta", 0.0, 1.0), ("guidance_scale", 0.0, None), ("train_lr", 0.0, None)):
        if getattr(proto, key) is not None:
            check_range(getattr(proto, key), f"paper_protocol.{key}", low=low, high=high)


@dataclass(frozen=True)
class TypedConfig:
    """The validated config: the root keys and one typed object per group of GROUPS, read as attributes
    (`typed.unet.model_channels`), so a reader and a type checker see which groups and keys exist."""

    root: RootConfig
    dataset: DatasetConfig
    autoencoder: AutoencoderConfig
    unet: UNetConfig
    diffusion: DiffusionConfig
    sampler: SamplerConfig
    metrics: MetricsConfig
    trainer: TrainerConfig
    classifier: ClassifierGroupConfig


def validate_config(cfg: DictConfig) -> TypedConfig:
    """Check the whole composed config; return the typed objects of the root keys and of every group.

    Raises ConfigError naming the first unknown key or bad value found: names that are not plain identifiers,
    NaN or infinite floats in any section, values out of their range.
    """
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    root_keys = {f.name for f in fields(RootConfig)}
    unknown = [k for k in cfg.keys() if k not in root_keys and k not in GROUPS and k != "hydra"]
    if unknown:
        raise ConfigError(
            f"unknown top-level config key(s): {', '.join(map(str, unknown))}. Allowed: "
            f"{', '.join(sorted(root_keys | set(GROUPS)))}"
        )
    missing = [g for g in GROUPS if g not in cfg and g not in OPTIONAL_GROUPS]
    if missing:
        raise ConfigError(f"config is missing group(s): {', '.join(missing)}")
    root_part = OmegaConf.create({k: cfg[k] for k in cfg.keys() if k in root_keys})
    root = merge_into_schema(RootConfig, root_part, "<root>")
    _check_root(root)
    bad_stages = [s for s in root.stages if s not in STAGES]
    bad_force = [s for s in root.force if s not in STAGES and s != "all"]
    if bad_stages or bad_force:
        raise ConfigError(f"unknown stage name(s) {bad_stages + bad_force}; allowed: {', '.join(STAGES)} (force also 'all')")
    check_compile_mode(root.sampling_speed.compile_mode, "sampling_speed.compile_mode")
    groups: dict[str, Any] = {}
    for group in GROUPS:
        try:
            groups[group] = GROUP_VALIDATORS[group](cfg[group] if group in cfg else None)
        except (ValueError, KeyError, TypeError, OmegaConfBaseException) as exc:
            if isinstance(exc, ConfigError) and group in ROOT_SCHEMA_GROUPS:
                raise
            raise ConfigError(f"invalid config in group '{group}': {exc}") from exc
        # every section, whichever validator it has, holds finite floats only
        check_finite(groups[group], group)
    typed = TypedConfig(root=root, **groups)
    _check_concat_inputs(typed)
    check_classifier_fits(typed)
    _check_text_inputs(typed)
    return typed


def text_encoder_config(cond: ConditioningConfig):
    """The text encoder's typed sizes (`TextEncoderConfig`) from `conditioning.text_encoder`; ConfigError naming a
    bad key."""
    from replication.models.text_encoder import validate_text_encoder_cfg

    return validate_text_encoder_cfg(cond.text_encoder, group="conditioning.text_encoder")


def _check_text_inputs(typed: TypedConfig) -> None:
    """A text-conditioned model: the encoder's width is the U-Net's cross-attention context, its sequence the
    tokenizer's 77 ids; guidance is against the empty prompt, so no null class, and a trained model is guided only
    if training dropped captions."""
    cond = typed.root.conditioning
    if cond.kind is not ConditioningKind.text:
        return
    from replication.data.tokenizer import MAX_LENGTH

    check_range(cond.caption_drop_prob, "conditioning.caption_drop_prob", low=0.0, high=1.0)
    check_range(cond.probe_samples, "conditioning.probe_samples", low=0)
    if not cond.vocab_path:
        raise ConfigError("conditioning.kind=text needs conditioning.vocab_path: the bert-base-uncased vocab.txt the "
                          "captions are tokenized with (nothing is downloaded)")
    if cond.text_encoder is None:
        raise ConfigError("conditioning.kind=text needs conditioning.text_encoder: {n_embed, n_layer} at least "
                          "(models/text_encoder.py TextEncoderConfig)")
    enc = text_encoder_config(cond)
    if enc.max_seq_len != MAX_LENGTH:
        raise ConfigError(f"conditioning.text_encoder.max_seq_len must be {MAX_LENGTH}, the tokenizer's caption length "
                          f"(the release's BERTTokenizer), got {enc.max_seq_len}")
    unet = typed.unet
    if not unet.use_spatial_transformer or unet.context_dim != enc.n_embed:
        raise ConfigError(f"conditioning.kind=text feeds the encoder's {enc.n_embed}-wide output to cross-attention: "
                          f"unet.use_spatial_transformer must be true and unet.context_dim {enc.n_embed} (got "
                          f"{unet.use_spatial_transformer}, {unet.context_dim})")
    if unet.num_classes:
        raise ConfigError(f"conditioning.kind=text conditions through cross-attention only: unet.num_classes must be "
                          f"null, got {unet.num_classes}")
    diffusion = typed.diffusion
    if diffusion.null_class is not None or diffusion.cond_drop_prob:
        raise ConfigError("conditioning.kind=text guides against the empty prompt \"\" and drops captions with "
                          "conditioning.caption_drop_prob: diffusion.null_class must be null and "
                          f"diffusion.cond_drop_prob 0 (got {diffusion.null_class}, {diffusion.cond_drop_prob})")
    trains = not typed.trainer.pretrained and "train_ldm" in typed.root.stages
    if trains and typed.sampler.guidance_scale != 1.0 and cond.caption_drop_prob == 0.0:
        raise ConfigError(f"sampler.guidance_scale={typed.sampler.guidance_scale:g} guides against the empty prompt, "
                          "which a model trained without caption dropout never saw: set "
                          "conditioning.caption_drop_prob > 0 (or guidance_scale 1)")
    if cond.probe_prompts:
        from replication.data.builtin import parse_builtin_caption
        from replication.data.config import Family

        if typed.dataset.family is not Family.builtin or cond.probe_samples < 1:
            raise ConfigError("conditioning.probe_prompts compares samples with the colours the built-in captions "
                              "name: it needs the built-in captioned data and conditioning.probe_samples >= 1")
        for i, prompt in enumerate(cond.probe_prompts):
            try:
                parse_builtin_caption(prompt)
            except ValueError as exc:
                raise ConfigError(f"conditioning.probe_prompts[{i}]: {exc}") from None


def _check_concat_inputs(typed: TypedConfig) -> None:
    """A concat-conditioned U-Net reads z_t and the condition: its in_channels must be what the task joins.
    Image guiding compares the decoded sample with the low-resolution input, so only super-resolution has it."""
    kind = typed.root.conditioning.kind
    if typed.sampler.image_guidance_scale > 0.0 and kind != ConditioningKind.lowres:
        raise ConfigError(f"sampler.image_guidance_scale={typed.sampler.image_guidance_scale:g} guides toward the "
                          f"low-resolution input, which only conditioning.kind=lowres has (got {kind.value}); set "
                          "it to 0")
    if kind not in CONCAT_KINDS:
        return
    from replication.models.concat_conditioning import concat_in_channels

    latent = typed.autoencoder.embed_dim
    want = concat_in_channels(CONCAT_TASK[kind], latent)
    if typed.unet.in_channels != want:
        raise ConfigError(f"conditioning.kind={kind.value} joins a {latent}-channel latent with its condition: "
                          f"unet.in_channels must be {want}, got {typed.unet.in_channels}")
    if typed.unet.out_channels != latent:
        raise ConfigError(f"conditioning.kind={kind.value}: unet.out_channels must be the latent's {latent}, got "
                          f"{typed.unet.out_channels}")
    if typed.unet.num_classes or typed.unet.context_dim:
        raise ConfigError(f"conditioning.kind={kind.value} conditions by concatenation only: the U-Net takes no "
                          "num_classes or context_dim")
    from replication.data.conditions import ConditionError, task_conditions
    from replication.models.autoencoder_config import downsampling_factor

    cond = typed.root.conditioning
    try:
        task_conditions(cond, downsampling_factor(typed.autoencoder))
    except ConditionError as exc:
        raise ConfigError(str(exc)) from None


def check_concat_training(typed: TypedConfig) -> None:
    """A concat-conditioned LDM trains on a fresh condition per visit (a new degradation or mask) made from the
    image, so it cannot train on cached latents. Checked by the pipeline's preflight and by train_ldm itself; loading
    such a model for inference does not care."""
    kind = typed.root.conditioning.kind
    if kind in CONCAT_KINDS and typed.trainer.use_latent_cache and not typed.trainer.pretrained:
        raise ConfigError(f"conditioning.kind={kind.value} trains on a fresh condition per visit (a new degradation "
                          "or mask), made from the image: set trainer.use_latent_cache=false")


def to_container(cfg: Any) -> Any:
    """Plain dict/list view of a DictConfig or a typed dataclass, with enums as their values."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if hasattr(cfg, "__dataclass_fields__"):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    return cfg
