"""Stage 5: samples from the trained LDM (paper Sec. 4; DDIM [84] with the original's step spacing).

Samples are written in shards of `sample_shard_size`; sample i always uses seed `sampler.seed + i`
(per-sample streams), so a killed job, rerun, makes only the missing shards and the final set equals an
uninterrupted run whatever the batch size or number of processes.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from replication.config import ConditioningKind, conditioning_record
from replication.samples import SHARD_PATTERN
from replication.stages.artifacts import (CURVES_DIR, LDM_EMA, LDM_SNAPSHOTS, SAMPLES_DIR, load_first_stage, load_ldm,
                                          num_label_classes, to_uint8)
from replication.stages.context import StageContext, StageError
from replication.stages.entry import hydra_entry
from replication.stages.execute import execute
from replication.stages.fingerprint import stage_content_id
from replication.utils.io import atomic_path, atomic_write_json, check_free_space, read_json
from replication.utils.verify import file_sha256, hash_beside, recorded_hash, write_hash_beside
from replication.utils.progress import ProgressLog
from replication.utils.rng import StackedRandomGenerator

STAGE = "sample"
SAMPLES_KEY = "key.json"
log = logging.getLogger("replication")


class Generator:
    """The whole generative chain as one callable: per-sample noise -> sampler -> decode -> uint8 NHWC."""

    def __init__(self, unet: torch.nn.Module, first_stage: torch.nn.Module, scale_factor: float, typed: dict[str, Any],
                 device: torch.device, conditions: Optional[Any] = None, prompts: Optional[list[str]] = None,
                 classifier: Optional[torch.nn.Module] = None):
        from replication.perf import FastForward, FastPath

        speed = typed.root.sampling_speed
        fast = FastPath(bf16=speed.precision.value == "bf16", channels_last=speed.channels_last, compile=speed.compile,
                        compile_mode=speed.compile_mode) if device.type == "cuda" else FastPath()
        self.unet, self.first_stage, self.scale_factor = unet, first_stage, scale_factor
        self.unet_call = FastForward(unet, fast, device)  # the decoder stays eager fp32
        self.typed, self.device = typed, device
        # concat tasks: sample i is made from evaluation image i and its fixed condition (data/conditions.py)
        self.conditions = conditions
        # text: sample i's prompt (the caption of evaluation image i), tokenized with the experiment's vocabulary;
        # guidance is against the empty prompt ""
        self.prompts = prompts
        self.tokenizer = None
        if typed.root.conditioning.kind is ConditioningKind.text:
            from replication.stages.artifacts import caption_tokenizer

            self.tokenizer = caption_tokenizer(typed)
        self.schedule = typed.diffusion.make_schedule()
        self.num_classes = num_label_classes(typed)
        self.null_class = typed.diffusion.null_class
        # classifier guidance (sampler.classifier_scale > 0, LDM-8-G): the noisy-latent classifier, eager fp32 in
        # eval mode, whatever speed levers the U-Net call has
        self.classifier = classifier
        # image guiding (Tab. 5/11 "guiding" rows, paper App. C): the guider's loss on the decoded x0 prediction
        s = typed.sampler
        self.guide_loss = None
        if s.image_guidance_scale > 0:
            from replication.diffusion.guidance import build_guide_loss

            self.guide_loss = build_guide_loss(s.image_guidance_loss, typed.metrics.lpips_vgg_weights,
                                               typed.metrics.allow_standin, device)
        ucfg = typed.unet
        # the latent the sampler denoises: the U-Net's output channels (its input may also hold a concatenated
        # condition); U-Net image_size = latent size
        self.latent_shape = (ucfg.out_channels, ucfg.image_size, ucfg.image_size)

    def load_weights(self, path: Path) -> None:
        """Swap other U-Net weights (a Fig. 6 snapshot) into the same module, in place: a compiled call stays
        valid, so a series of snapshots is compiled once, not once per snapshot."""
        from replication.stages.artifacts import load_unet_weights

        load_unet_weights(self.unet, path)

    def denoiser(self, labels: Optional[torch.Tensor], guidance_scale: float, concat: Optional[torch.Tensor] = None,
                 tokens: Optional[torch.Tensor] = None):
        from replication.diffusion.denoiser import GuidanceError, sampling_denoiser

        null_tokens = self.tokenizer([""]).to(self.device) if tokens is not None else None
        try:
            denoiser = sampling_denoiser(self.unet_call, labels, self.null_class, guidance_scale, concat=concat,
                                         tokens=tokens, null_tokens=null_tokens)
        except GuidanceError as exc:
            raise StageError(str(exc)) from None
        return self.guide_by_classifier(denoiser, labels)

    def guide_by_classifier(self, denoiser, labels: Optional[torch.Tensor]):
        """`denoiser` (after any classifier-free guidance, as the release's DDIM applies its score_corrector) guided
        toward `labels` by the classifier with sampler.classifier_scale; `denoiser` itself at scale 0."""
        from replication.diffusion.guidance import classifier_guided

        scale = self.typed.sampler.classifier_scale
        if scale == 0.0:
            return denoiser
        if self.classifier is None or labels is None:
            raise StageError(f"sampler.classifier_scale={scale:g} guides toward class labels with the trained "
                             "classifier: " + ("no classifier was given" if self.classifier is None else
                                               "this model samples without class labels"))
        return classifier_guided(denoiser, self.classifier, labels, scale, self.schedule)

    def guide_by_image(self, denoiser, inputs: Optional[dict[str, Any]]):
        """`denoiser` guided toward consistency with each sample's low-resolution input (sampler.image_guidance_*);
        `denoiser` itself when image guidance is off."""
        if self.guide_loss is None:
            return denoiser
        from replication.diffusion.guidance import image_guided, superres_guide

        s = self.typed.sampler
        guide = superres_guide(self.guide_loss, inputs["lowres"].to(self.device), s.image_guidance_target)
        return image_guided(denoiser, self.first_stage.decode, guide, s.image_guidance_scale, self.schedule,
                            self.scale_factor)

    @torch.no_grad()
    def with_prompts(self, prompts: list[str]) -> "Generator":
        """The same networks with other prompts (sample i gets prompts[i]): the evaluation's probe sets."""
        other = copy.copy(self)
        other.prompts = list(prompts)
        return other

    def tokens(self, indices: np.ndarray, captions: Optional[list[str]] = None) -> torch.Tensor:
        """Token ids of `captions`, by default of the prompts of samples `indices`."""
        if captions is None:
            if self.prompts is None:
                raise StageError("a text-conditional model samples from prompts: none were given")
            if len(indices) and int(np.max(indices)) >= len(self.prompts):
                raise StageError(f"sample {int(np.max(indices))} has no prompt: {len(self.prompts)} prompts")
            captions = [self.prompts[int(i)] for i in indices]
        if len(captions) != len(indices):
            raise ValueError(f"{len(captions)} captions for {len(indices)} samples")
        return self.tokenizer(captions).to(self.device)

    @torch.no_grad()
    def __call__(self, indices: np.ndarray, steps: int, progress: bool = False,
                 labels: Optional[np.ndarray] = None, captions: Optional[list[str]] = None) -> np.ndarray:
        """Samples `indices`, sample i from seed sampler.seed + i; `labels`: their classes (class-conditional models;
        by default balanced, i % num_classes); `captions`: their prompts (text-conditional models; by default the
        generator's prompts of these samples)."""
        from replication.diffusion.config import run_sampler

        sampler = dataclasses.replace(self.typed.sampler, steps=steps)
        seeds = [sampler.seed + int(i) for i in indices]
        rng = StackedRandomGenerator(seeds, device=self.device)
        x_T = rng.randn((len(seeds), *self.latent_shape))
        y = None
        if self.num_classes:
            y = torch.as_tensor(indices % self.num_classes if labels is None else labels, dtype=torch.long,
                                device=self.device)
        inputs = self.conditions.inputs(indices) if self.conditions is not None else None
        concat = self.conditions.concat(inputs) if inputs is not None else None
        tokens = self.tokens(indices, captions) if self.tokenizer is not None else None
        denoiser = self.guide_by_image(self.denoiser(y, sampler.guidance_scale, concat, tokens=tokens), inputs)
        result = run_sampler(sampler, denoiser, x_T, self.schedule, rng=rng, progress=progress)
        x = self.first_stage.decode(result.x / self.scale_factor)
        if inputs is not None:
            x = self.conditions.finish(inputs, x)
        return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def make_generator(ctx: StageContext, weights: Optional[Path] = None, device: Optional[torch.device] = None) -> Generator:
    device = device or ctx.device
    unet, meta = load_ldm(ctx.run_dir, ctx.typed, device, weights=weights)
    first_stage = load_first_stage(ctx.run_dir, ctx.typed, device)
    classifier = None
    if ctx.typed.sampler.classifier_scale > 0.0:
        from replication.stages.artifacts import CLASSIFIER_WEIGHTS, load_classifier

        ctx.record_input(ctx.run_dir / CLASSIFIER_WEIGHTS)
        classifier = load_classifier(ctx.run_dir, ctx.typed, device)
    return Generator(unet, first_stage, float(meta["scale_factor"]), ctx.typed, device,
                     conditions=evaluation_conditions(ctx, first_stage, device), prompts=evaluation_prompts(ctx, meta),
                     classifier=classifier)


def evaluation_prompts(ctx: StageContext, meta: dict[str, Any]) -> Optional[list[str]]:
    """Text models: the captions of the FID reference split, sample i from the caption of evaluation image i (Tab. 2
    samples one image per MS-COCO validation caption); None for the other kinds. The vocabulary must be the one the
    model was trained with (its hash in the training's meta.json), or the same words would reach it as other ids."""
    if ctx.root.conditioning.kind is not ConditioningKind.text:
        return None
    from replication.data.prepare import REFERENCE, open_prepared

    vocab = Path(ctx.root.conditioning.vocab_path)
    trained = meta.get("text", {}).get("vocab_sha256")
    if trained is not None and vocab.is_file() and file_sha256(vocab) != trained:
        raise StageError(f"{vocab} is not the vocabulary the model was trained with (SHA-256 {file_sha256(vocab)[:12]}, "
                         f"training used {trained[:12]}): point conditioning.vocab_path at that file")
    images = open_prepared(ctx.typed.dataset, REFERENCE)
    ctx.record_input(images.card_path)
    if images.captions is None:
        raise StageError(f"conditioning.kind=text samples from the captions of the evaluation images, and dataset "
                         f"'{ctx.typed.dataset.name}' has none")
    return images.captions


def evaluation_conditions(ctx: StageContext, first_stage: torch.nn.Module, device: torch.device):
    """The evaluation images and fixed conditions of a concat task (None for the other kinds): the FID reference
    split, so sample i is compared with the image it was made from."""
    from replication.data.conditions import EvaluationConditions, task_conditions
    from replication.data.prepare import REFERENCE, open_prepared

    task = task_conditions(ctx.root.conditioning, int(getattr(first_stage, "downsampling_factor", 1)))
    if task is None:
        return None
    images = open_prepared(ctx.typed.dataset, REFERENCE)
    ctx.record_input(images.card_path)
    return EvaluationConditions(task, images, REFERENCE, ctx.root.conditioning.eval_seed, first_stage.encode, device)


def sample_to_shards(gen: Generator, out_dir: Path, num_samples: int, steps: int, shard_size: int, batch_size: int,
                     progress: bool = True, desc: str = "sample", dist: Optional[Any] = None,
                     key: Optional[str] = None) -> dict[str, Any]:
    """Write shard_XXXXXX.npy (uint8 NHWC) files; existing complete shards are kept, missing ones made.
    Under torchrun, rank r makes the shards s with s % world == r (per-sample seeds make the split irrelevant).

    `key` names what the images depend on (the weights' training run, the sampler settings, the step count): the
    folder remembers it, and shards made under another key (another model, another eta...) are deleted rather
    than kept, or a retrained model would be evaluated on its predecessor's samples. The batch size and the number
    of samples stay out of it: per-sample seeds make shards independent of both."""
    from replication.training.distributed import DistInfo, barrier

    dist = dist or DistInfo()
    out_dir.mkdir(parents=True, exist_ok=True)
    if key is not None:
        if dist.is_main:
            _forget_other_samples(out_dir, key)
        barrier(dist)
    num_shards = (num_samples + shard_size - 1) // shard_size
    h = gen.latent_shape[1] * getattr(gen.first_stage, "downsampling_factor", 1)
    check_free_space(out_dir, num_samples * h * h * 3, "samples")
    made, seconds = 0, 0.0
    mine = [(shard, shard * shard_size, min(num_samples, (shard + 1) * shard_size))
            for shard in range(dist.rank, num_shards, dist.world_size)]
    todo = [(shard, lo, hi) for shard, lo, hi in mine if not _shard_intact(out_dir / SHARD_PATTERN.format(shard), hi - lo)]
    kept = sum(hi - lo for _, lo, hi in mine) - sum(hi - lo for _, lo, hi in todo)
    with ProgressLog(desc, total=sum(hi - lo for _, lo, hi in mine), initial=kept, unit="img",
                     bar=progress) as bar:
        for shard, lo, hi in todo:
            path = out_dir / SHARD_PATTERN.format(shard)
            parts = []
            for start in range(lo, hi, batch_size):
                idx = np.arange(start, min(hi, start + batch_size))
                t0 = time.perf_counter()
                parts.append(gen(idx, steps))
                seconds += time.perf_counter() - t0
                made += len(idx)
                bar.update(len(idx))
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.concatenate(parts))
            # the shard's hash, written after it: a shard is trusted on resume only when the two agree
            write_hash_beside(path)
    barrier(dist)
    index = {"num_samples": num_samples, "shard_size": shard_size, "num_shards": num_shards, "steps": steps,
             "img_per_s": (made / seconds) if seconds > 0 else None}
    if dist.is_main:
        # exactly the shards of this configuration, with their hashes: readers take these and nothing else
        index["shards"] = [{"file": SHARD_PATTERN.format(s), "count": min(num_samples, (s + 1) * shard_size) - s * shard_size,
                            "sha256": recorded_hash(out_dir / SHARD_PATTERN.format(s))}
                           for s in range(num_shards)]
        old = read_json(out_dir / "index.json") if (out_dir / "index.json").exists() else {}
        if made == 0 and old.get("shards") == index["shards"]:
            # nothing made now: the throughput is that of the run that made these shards, and the index stays
            # byte for byte what it was (its content id too, so evaluation stays valid)
            index["img_per_s"] = old.get("img_per_s")
        extra = sorted({f.name for f in out_dir.glob("shard_*.npy")} - {r["file"] for r in index["shards"]})
        if extra:
            log.info("%s: %d shard(s) beyond the %d samples configured are kept on disk but not part of this "
                     "sample set (%s ...)", out_dir, len(extra), num_samples, extra[0])
        atomic_write_json(out_dir / "index.json", index)
    barrier(dist)
    return {**index, "made_now": made}


def _shard_intact(path: Path, rows: int) -> bool:
    """A shard made earlier may be kept only if it has the expected rows and the hash written beside it; any
    other file there (truncated, overwritten, made without a hash) is named, removed and made again."""
    if not path.exists():
        return False
    recorded = recorded_hash(path)
    problem = None
    if recorded is None:
        problem = "no recorded hash"
    elif file_sha256(path) != recorded:
        problem = "content differs from its recorded hash"
    else:
        try:
            if np.load(path, mmap_mode="r").shape[0] != rows:
                problem = f"not {rows} samples"
        except (OSError, ValueError) as exc:
            problem = f"unreadable ({exc})"
    if problem is None:
        return True
    log.warning("sample shard %s is not usable (%s): made again", path, problem)
    path.unlink()
    hash_beside(path).unlink(missing_ok=True)
    return False


def _forget_other_samples(out_dir: Path, key: str) -> None:
    key_file = out_dir / SAMPLES_KEY
    old = read_json(key_file).get("key") if key_file.exists() else None
    shards = sorted(out_dir.glob("shard_*.npy"))
    if old != key and shards:
        log.warning("%s holds %d shard(s) made for other settings or another model (key %s, now %s): deleted, "
                    "sampling again", out_dir, len(shards), str(old)[:12], key[:12])
        for f in shards:
            f.unlink()
            hash_beside(f).unlink(missing_ok=True)
        (out_dir / "index.json").unlink(missing_ok=True)
    if old != key:
        atomic_write_json(key_file, {"key": key})


def _samples_key(ctx: StageContext):
    """key(steps, what) for sample_to_shards: the weights (train_ldm's content id) and the decoder (the
    autoencoder's), the sampler settings but the batch size, the sampling precision, the shard size and the
    conditioning."""
    from replication.config import to_container
    from replication.utils.io import sha256_json

    done = ctx.run_dir / "train_ldm" / "done.json"
    ae_done = ctx.run_dir / "train_autoencoder" / "done.json"
    weights = stage_content_id(read_json(done)) if done.exists() else None
    decoder = stage_content_id(read_json(ae_done)) if ae_done.exists() else None
    sampler = {k: v for k, v in to_container(ctx.typed.sampler).items() if k not in ("batch_size", "num_samples")}
    base = {"weights": weights, "decoder": decoder, "sampler": sampler, "precision": ctx.root.sampling_speed.precision.value,
            "shard_size": ctx.root.sample_shard_size, "conditioning": conditioning_record(ctx.root.conditioning)}
    vocab = ctx.root.conditioning.vocab_path
    if ctx.root.conditioning.kind is ConditioningKind.text and vocab and Path(vocab).is_file():
        base["vocab_sha256"] = file_sha256(Path(vocab))  # the same prompts are other ids under another vocabulary
    if ctx.typed.sampler.classifier_scale > 0.0:  # the guiding classifier's weights (its stage's content id)
        cls_done = ctx.run_dir / "train_classifier" / "done.json"
        base["classifier"] = stage_content_id(read_json(cls_done)) if cls_done.exists() else None
    else:  # unguided samples do not depend on the classifier setting
        sampler.pop("classifier_scale")
    return lambda steps, what: sha256_json({**base, "steps": steps, "what": what})


def _body(ctx: StageContext) -> dict[str, Any]:
    from replication.training.distributed import init_distributed, local_device

    from replication.data.conditions import ConditionError

    sampler, root = ctx.typed.sampler, ctx.root
    dist = init_distributed(ctx.device)
    device = local_device(ctx.device, dist)
    ctx.record_input(ctx.run_dir / LDM_EMA)
    gen = make_generator(ctx, device=device)
    if gen.conditions is not None:
        try:
            for n in (sampler.num_samples, root.curves.num_samples, ctx.typed.trainer.eval_num_samples):
                gen.conditions.check_count(n)
        except ConditionError as exc:
            raise StageError(str(exc)) from None
    if gen.prompts is not None:
        for n in (sampler.num_samples, root.curves.num_samples, ctx.typed.trainer.eval_num_samples):
            if n > len(gen.prompts):
                raise StageError(f"{n} samples asked for, but the evaluation split has {len(gen.prompts)} captions "
                                 "(one sample per caption): sample fewer")
    result: dict[str, Any] = {}
    key = _samples_key(ctx)
    main = sample_to_shards(gen, ctx.run_dir / SAMPLES_DIR, sampler.num_samples, sampler.steps, root.sample_shard_size,
                            sampler.batch_size, ctx.progress, desc=f"sample {sampler.kind} {sampler.steps} steps", dist=dist,
                            key=key(sampler.steps, "main"))
    result["samples"] = main
    outputs = [ctx.run_dir / SAMPLES_DIR]
    ctx.stats(event="sampled", **{k: v for k, v in main.items() if v is not None})
    # Fig. 7: FID against DDIM steps and against throughput
    curves = []
    for steps in root.curves.ddim_steps:
        d = ctx.run_dir / CURVES_DIR / f"steps_{steps:04d}"
        info = sample_to_shards(gen, d, root.curves.num_samples, steps, root.sample_shard_size, sampler.batch_size,
                                ctx.progress, desc=f"curve: {steps} steps", dist=dist, key=key(steps, "curve"))
        curves.append({"steps": steps, "dir": str(d), "img_per_s": info["img_per_s"]})
        outputs.append(d)
    # Fig. 6: FID against training steps, from EMA snapshots written during training
    snapshots = []
    snap_dir = ctx.run_dir / LDM_SNAPSHOTS
    n_eval = ctx.typed.trainer.eval_num_samples
    for snap in sorted(snap_dir.glob("step_*.safetensors")) if n_eval > 0 else []:
        step = int(snap.stem.split("_")[1])
        gen.load_weights(snap)  # the main samples and Fig. 7 curves are done: reuse the (compiled) generator
        d = ctx.run_dir / "sample" / "snapshots" / f"step_{step:09d}"
        sample_to_shards(gen, d, n_eval, sampler.steps, root.sample_shard_size, sampler.batch_size, ctx.progress,
                         desc=f"snapshot step {step}", dist=dist, key=key(sampler.steps, snap.name))
        snapshots.append({"train_step": step, "dir": str(d)})
        outputs.append(d)
    result["curves"], result["snapshots"] = curves, snapshots
    series: dict[str, Any] = {"curves": curves, "snapshots": snapshots}
    if root.conditioning.kind is ConditioningKind.text and root.conditioning.probe_prompts:
        series["probes"] = _probe_samples(ctx, gen, key, dist)
        outputs += [Path(p["dir"]) for p in series["probes"]]
    atomic_write_json(ctx.stage_dir / "series.json", series)
    result["outputs"] = outputs + [ctx.stage_dir / "series.json"]
    return result


PROBES_DIR = "sample/probes"


def _probe_samples(ctx: StageContext, gen: Generator, key, dist) -> list[dict[str, Any]]:
    """conditioning.probe_samples samples of each probe prompt and of the empty prompt "" (the unconditional model),
    all from the seeds of samples 0..n-1, so the sets differ in their prompt only: the evaluation reads from them
    whether the captions steer the samples."""
    cond, sampler, root = ctx.root.conditioning, ctx.typed.sampler, ctx.root
    probes = []
    for k, prompt in enumerate([*cond.probe_prompts, ""]):
        d = ctx.run_dir / PROBES_DIR / (f"prompt_{k:02d}" if prompt else "unconditional")
        sample_to_shards(gen.with_prompts([prompt] * cond.probe_samples), d, cond.probe_samples, sampler.steps,
                         root.sample_shard_size, sampler.batch_size, ctx.progress, desc=f"probe {prompt!r}", dist=dist,
                         key=key(sampler.steps, f"probe:{prompt}"))
        probes.append({"prompt": prompt, "dir": str(d)})
    return probes


def run(cfg: DictConfig) -> dict[str, Any]:
    return execute(STAGE, cfg, _body)


main = hydra_entry(run)

if __name__ == "__main__":
    main()
