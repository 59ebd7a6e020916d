"""Stage 6: the paper's evaluation protocol (Sec. E.3.1): FID / IS / KID with torch-fidelity's
inception-v3-compat features against the prepared reference set, precision/recall the ADM way (k = 3),
bootstrap intervals and FID_inf when N < 50k; reconstruction metrics (Tab. 8) for autoencoder experiments."""
from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from replication.config import ExperimentKind, to_container
from replication.stages.artifacts import (AE_WEIGHTS, LDM_META, METRICS_FILE, RECON_METRICS_FILE,
                                          SAMPLES_DIR, load_first_stage, to_uint8)
from replication.stages.context import StageContext
from replication.stages.entry import hydra_entry
from replication.stages.execute import execute
from replication.utils.io import atomic_write_json, read_json

STAGE = "evaluate"
SCHEMA_VERSION = 1
log = logging.getLogger("replication")


def build_feature_extractor(ctx: StageContext):
    """The configured extractor; only where `metrics.allow_standin` is set (smoke) may missing Inception
    weights fall back to the labelled stand-in, loudly."""
    from replication.metrics.features import WeightsNotFoundError, build_extractor

    m = ctx.typed.metrics
    weights = m.inception_weights if m.feature_extractor == "inception-v3-compat" else m.vgg16_weights
    try:
        return build_extractor(m.feature_extractor, weights, ctx.device, allow_standin=m.allow_standin)
    except WeightsNotFoundError as exc:
        if not m.allow_standin:
            raise
        log.warning("%s\nFalling back to the STAND-IN feature extractor: numbers are NOT comparable to the paper.", exc)
        return build_extractor("standin", None, ctx.device, allow_standin=True)


def _reference_batches(images_list, batch_size: int) -> Iterator[torch.Tensor]:
    for images in images_list:
        for start in range(0, len(images), batch_size):
            idx = np.arange(start, min(len(images), start + batch_size))
            yield torch.from_numpy(np.ascontiguousarray(images.get_batch(idx))).permute(0, 3, 1, 2).contiguous()


def reference_stats(ctx: StageContext, extractor):
    """Statistics of the FID reference set, prepared with the training preprocessing; cached by dataset, split,
    preprocessing hash and extractor."""
    from replication.data.prepare import REFERENCE, open_prepared
    from replication.metrics.reference import load_or_compute_reference

    dataset, m = ctx.typed.dataset, ctx.typed.metrics
    images = open_prepared(dataset, REFERENCE)
    images_list, spec_hash, splits = [images], images.spec_hash, [dataset.fid_reference.value]
    ctx.record_input(images.card_path)
    cache_dir = Path(m.reference_cache_dir)
    stats = load_or_compute_reference(cache_dir, dataset.name, "+".join(splits), spec_hash, extractor,
                                      lambda: _reference_batches(images_list, m.batch_size),
                                      pr_count=m.pr_reference_images, seed=m.seed, progress=ctx.progress,
                                      expected_images=sum(len(x) for x in images_list),
                                      source_id=reference_source_id(images))
    return stats, spec_hash


def reference_source_id(images) -> str:
    """What the reference images hold: a hash of the SHA-256 of their prepared files (of each part, for a
    reference set joined from train and val), as their dataset cards record them."""
    from replication.utils.io import sha256_json

    card = images.card
    return sha256_json(card.get("files") or [part.get("files") for part in card.get("part_cards", [])])


def _features(shard_dir: Path, extractor, batch_size: int, progress: bool,
              png_dir: Optional[Path] = None) -> dict[str, torch.Tensor]:
    from replication.metrics.streaming import accumulate, iter_nhwc_shards
    from replication.samples import verified_shards

    shards = verified_shards(shard_dir)  # the index's shards of this configuration, checked against their hashes
    total = read_json(shard_dir / "index.json")["num_samples"]
    return accumulate(iter_nhwc_shards(shards, batch_size), extractor, png_dir=png_dir, progress=progress, total=total)


def _fid(feats: dict[str, torch.Tensor], ref) -> float:
    from replication.metrics.features import POOL
    from replication.metrics.fid import fid_features_to_stats

    return float(fid_features_to_stats(feats[POOL], ref.mu, ref.sigma))


def _steps_run(ctx: StageContext, steps: int) -> int:
    from replication.diffusion.ddim import ddim_timesteps

    s = ctx.typed.sampler
    if str(s.kind) in ("ddim", "plms"):
        return int(len(ddim_timesteps(steps, ctx.typed.diffusion.timesteps, s.spacing)))
    return steps


def _paper_protocol(ctx: StageContext) -> dict[str, Any]:
    return {k: v for k, v in to_container(ctx.root.paper_protocol).items() if v is not None}


def _paper_ref(ctx: StageContext) -> Optional[dict[str, Any]]:
    ref = {k: v for k, v in to_container(ctx.root.paper).items() if v is not None and k != "value"}
    return ref or None


def _reasons(ctx: StageContext, extra: list[str]) -> list[str]:
    reasons = list(extra)
    if not ctx.root.comparable:
        reasons.insert(0, ctx.root.not_comparable_reason or "experiment marked not comparable")
    return reasons


def _evaluate_ldm(ctx: StageContext) -> dict[str, Any]:
    from replication.metrics.evaluate import evaluate_samples

    m, sampler = ctx.typed.metrics, ctx.typed.sampler
    extractor = build_feature_extractor(ctx)
    ref, spec_hash = reference_stats(ctx, extractor)
    samples_dir = ctx.run_dir / SAMPLES_DIR
    ctx.record_input(samples_dir / "index.json")
    png_dir = ctx.stage_dir / "png" if m.export_png else None  # optional PNG export of the evaluated samples
    feats = _features(samples_dir, extractor, m.batch_size, ctx.progress, png_dir)
    pr_args: dict[str, Any] = {}
    if m.pr and m.pr_protocol == "torch-fidelity-vgg16-k3":  # torch-fidelity's VGG16 variant, labelled as such
        from replication.metrics.features import build_extractor

        vgg = build_extractor("vgg16", m.vgg16_weights, ctx.device)
        pr_ref, _ = reference_stats(ctx, vgg)
        pr_args = {"pr_sample_feats": _features(samples_dir, vgg, m.batch_size, ctx.progress), "pr_reference": pr_ref,
                   "pr_extractor": vgg}
    res = evaluate_samples(feats, ref, m, extractor, spec_hash, progress=ctx.progress, **pr_args)
    task = _task_metrics(ctx, samples_dir, feats, extractor, res["metrics"])
    if task is None:
        task = _text_metrics(ctx)
    ldm_meta = read_json(ctx.run_dir / LDM_META)
    series = read_json(ctx.run_dir / "sample" / "series.json")
    index = read_json(samples_dir / "index.json")
    curves: dict[str, list[dict[str, Any]]] = {"fid_vs_ddim_steps": [], "fid_vs_train_steps": [], "train_loss": []}
    for c in series["curves"]:
        curves["fid_vs_ddim_steps"].append({"steps": c["steps"], "FID": _fid(_features(Path(c["dir"]), extractor, m.batch_size, False), ref),
                                            "samples_per_s": c["img_per_s"]})
    for s in series["snapshots"]:
        curves["fid_vs_train_steps"].append({"train_step": s["train_step"],
                                             "FID": _fid(_features(Path(s["dir"]), extractor, m.batch_size, False), ref)})
    stats_file = ctx.run_dir / "train_ldm" / "stats.jsonl"
    if stats_file.exists():
        from replication.utils.io import read_jsonl

        curves["train_loss"] = train_loss_curve(read_jsonl(stats_file))
    protocol = {**res["protocol"], "sampler": str(sampler.kind), "steps": sampler.steps,
                "steps_run": _steps_run(ctx, sampler.steps), "eta": sampler.eta, "ddim_spacing": sampler.spacing,
                "guidance_scale": sampler.guidance_scale if ctx.root.conditioning.kind.value != "none" else None,
                "classifier_scale": sampler.classifier_scale or None,
                "image_guidance": (f"scale {sampler.image_guidance_scale:g}, {sampler.image_guidance_loss} guider "
                                   f"against the {sampler.image_guidance_target} input"
                                   if sampler.image_guidance_scale > 0 else None),
                "ema": bool(ldm_meta.get("ema")), "train_steps": ldm_meta.get("steps"),
                "train_precision": ldm_meta.get("precision", "imported" if ldm_meta.get("imported") else None),
                **_training_batch(ldm_meta),
                "autoencoder": ctx.typed.autoencoder.name, "scale_factor": ldm_meta.get("scale_factor"),
                "sample_seed": sampler.seed, "notes": res["notes"]}
    reasons = _reasons(ctx, res["not_comparable_reasons"])
    metrics = {"schema_version": SCHEMA_VERSION, "experiment": ctx.root.name,
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(), "comparable": not reasons,
               "not_comparable_reasons": reasons, "paper": _paper_ref(ctx), "metrics": res["metrics"],
               "fid_extrapolated_infinity": res["fid_extrapolated_infinity"], "protocol": protocol,
               "paper_protocol": _paper_protocol(ctx), "curves": curves,
               "throughput": {"sampling_img_per_s": index.get("img_per_s"), "device": str(ctx.device)},
               "first_stage": {"psnr": first_stage_psnr(ctx)}}
    if task is not None:
        metrics["task"] = task
    return metrics


def _train_split_stats(ctx: StageContext, extractor):
    """Feature statistics of the prepared training split (Tab. 5's second FID column, "FID against train")."""
    from replication.data.prepare import open_prepared
    from replication.metrics.reference import load_or_compute_reference

    dataset, m = ctx.typed.dataset, ctx.typed.metrics
    images = open_prepared(dataset, "train")
    ctx.record_input(images.card_path)
    return load_or_compute_reference(Path(m.reference_cache_dir), dataset.name, "train", images.spec_hash, extractor,
                                     lambda: _reference_batches([images], m.batch_size), pr_count=m.pr_reference_images,
                                     seed=m.seed, progress=ctx.progress, expected_images=len(images),
                                     source_id=reference_source_id(images))


TASK_EXAMPLES = 8  # evaluation images shown in the report's figure of a concat task
EXAMPLES_FILE = "examples.npz"


def _write_examples(ctx: StageContext, conditions, samples_dir: Path, inpainting: bool) -> str:
    """The first TASK_EXAMPLES evaluation images as the report's figure shows them, uint8 NHWC: super-resolution
    `lowres` (nearest-upsampled to the output size), `output`, `target`; inpainting `input` (the hole grey), `mask`
    (255 = hole), `output`, `target`. Returns the file's path relative to the run folder."""
    from replication.samples import verified_shards

    first = np.load(verified_shards(samples_dir)[0], mmap_mode="r")
    n = min(TASK_EXAMPLES, len(first))
    idx = np.arange(n)
    inputs = conditions.inputs(idx)
    target = np.ascontiguousarray(conditions.images.get_batch(idx))
    arrays = {"output": np.array(first[:n]), "target": target}
    if inpainting:
        hole = (inputs["mask"][:, 0].numpy() > 0)
        arrays["mask"] = (hole * 255).astype(np.uint8)
        arrays["input"] = np.where(hole[..., None], np.uint8(128), target)
    else:
        scale = target.shape[1] // inputs["lowres_uint8"].shape[1]
        arrays["lowres"] = inputs["lowres_uint8"].repeat(scale, axis=1).repeat(scale, axis=2)
    path = ctx.stage_dir / EXAMPLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return str(path.relative_to(ctx.run_dir))


def _task_metrics(ctx: StageContext, samples_dir: Path, feats: dict[str, torch.Tensor], extractor,
                  metrics: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The concat tasks' scores, each sample against the evaluation image it was made from (data/conditions.py).
    Super-resolution (Tab. 5, 11): FID against the validation and the training features, IS, PSNR and SSIM (mean and
    std over images). Inpainting (Tab. 6, 7): FID and LPIPS over all images and per masked-area bin, "40-50%" as
    the table quotes it. Added to `metrics` under the paper's metric names; returns the task's record."""
    from replication.data.conditions import EvaluationConditions, Inpainting, task_conditions
    from replication.data.prepare import REFERENCE, open_prepared
    from replication.metrics.evaluate import FID
    from replication.metrics.features import POOL
    from replication.metrics.reconstruction import ReconstructionAccumulator, summarize
    from replication.metrics.streaming import FeatureAccumulator, iter_nhwc_shards
    from replication.samples import verified_shards

    cond_cfg = ctx.root.conditioning
    task = task_conditions(cond_cfg)
    if task is None:
        return None
    m = ctx.typed.metrics
    images = open_prepared(ctx.typed.dataset, REFERENCE)
    conditions = EvaluationConditions(task, images, REFERENCE, cond_cfg.eval_seed, lambda x: x, torch.device("cpu"))
    inpainting = isinstance(task, Inpainting)
    lpips_metric = _lpips(ctx)[0] if inpainting else None
    paired = ReconstructionAccumulator(lpips_metric=lpips_metric)
    originals = FeatureAccumulator(extractor) if inpainting else None
    areas: list[np.ndarray] = []
    start = 0
    for batch in iter_nhwc_shards(verified_shards(samples_dir), m.batch_size):
        idx = np.arange(start, start + batch.shape[0])
        start += batch.shape[0]
        orig = torch.from_numpy(np.ascontiguousarray(images.get_batch(idx))).permute(0, 3, 1, 2).contiguous()
        paired.add(orig, batch)
        if inpainting:
            originals.add(orig)
            areas.append(conditions.inputs(idx)["area"])
    per_image = paired.per_image()
    record: dict[str, Any] = {**task.card(), "eval_seed": cond_cfg.eval_seed, "images": start,
                              "split": f"reference set ({ctx.typed.dataset.fid_reference.value})",
                              "examples": _write_examples(ctx, conditions, samples_dir, inpainting)}
    if not inpainting:
        train_ref = _train_split_stats(ctx, extractor)
        fid = metrics.get(FID, {}).get("value")
        metrics["FID_valsplit_ref"] = {"value": fid, "n_samples": start, "reference": record["split"]}
        metrics["FID_trainsplit_ref"] = {"value": _fid(feats, train_ref), "n_samples": start,
                                         "reference": "train split"}
        for key in ("PSNR", "SSIM"):
            metrics[key] = {**summarize(per_image[key]), "n_samples": start}
        return record
    from replication.data.masks import bin_label
    from replication.metrics.binned import binned_scores

    hard = bin_label(4)  # the "40-50%" subset of Tab. 7
    scores = binned_scores(np.concatenate(areas), per_image.get("LPIPS"), feats[POOL].numpy(),
                           originals.result()[POOL].numpy())
    metrics["FID_all"] = {"value": scores["all"]["FID"], "n_samples": start, "reference": "the same images, unmasked"}
    metrics["LPIPS_all"] = {**scores["all"]["LPIPS"], "n_samples": start}
    hard_scores = scores["bins"][hard]
    metrics["FID_40-50pct_masked"] = {"value": hard_scores["FID"], "n_samples": hard_scores["count"],
                                      **({"note": hard_scores["FID_note"]} if "FID_note" in hard_scores else {})}
    if "LPIPS" in hard_scores:
        metrics["LPIPS_40-50pct_masked"] = {**hard_scores["LPIPS"], "n_samples": hard_scores["count"]}
    record["bins"] = scores["bins"]
    record["lpips_standin"] = bool(getattr(lpips_metric, "is_standin", False))
    return record


PROBE_EXAMPLES = 8  # samples of each probe prompt kept for the report's figure
PROBE_FILE = "probes.npz"


def _mean_colours(shard_dir: Path) -> np.ndarray:
    """float64 (N, 3): the mean RGB of every sample of a sample folder."""
    from replication.samples import load_samples

    return load_samples(shard_dir).astype(np.float64).mean(axis=(1, 2))


def text_probe_record(prompts: list[str], colours: list[np.ndarray], unconditional: np.ndarray) -> dict[str, Any]:
    """Whether the captions steer the samples, on a property each probe prompt names: the gradient colours of the
    built-in captions ("... on a red and yellow gradient"), the background of most of the image. Per prompt: the
    mean RGB of its samples and its distance to the mean of the two named colours, against the same distance for
    the unconditional samples (prompt ""), made from the same seeds. `captions_matter` holds when every prompt's
    samples are nearer its named colours than the unconditional samples are; `separation` compares how far apart
    two prompts' samples lie with how far apart their named colours are (1: as far, 0: no difference)."""
    from replication.data.builtin import colour_rgb, parse_builtin_caption

    uncond_mean = unconditional.mean(axis=0)
    rows, means, targets = [], [], []
    for prompt, per_sample in zip(prompts, colours):
        gradient = parse_builtin_caption(prompt)["gradient"]
        target = np.mean([colour_rgb(c) for c in gradient], axis=0).astype(np.float64)
        mean = per_sample.mean(axis=0)
        dist, uncond_dist = float(np.linalg.norm(mean - target)), float(np.linalg.norm(uncond_mean - target))
        rows.append({"prompt": prompt, "named_colours": list(gradient), "named_rgb": target.round(2).tolist(),
                     "mean_rgb": mean.round(2).tolist(), "distance_to_named": round(dist, 3),
                     "unconditional_distance_to_named": round(uncond_dist, 3), "nearer_than_unconditional": dist < uncond_dist,
                     "samples": int(len(per_sample))})
        means.append(mean)
        targets.append(target)
    record: dict[str, Any] = {"property": "mean RGB of the samples against the mean of the gradient colours the prompt "
                                          "names (0-255; the same seeds for every prompt and for \"\")",
                              "prompts": rows, "unconditional_mean_rgb": uncond_mean.round(2).tolist(),
                              "captions_matter": all(r["nearer_than_unconditional"] for r in rows)}
    if len(prompts) >= 2:
        named = targets[0] - targets[1]
        record["separation"] = {"prompts": prompts[:2], "named_distance": round(float(np.linalg.norm(named)), 3),
                                "samples_distance": round(float(np.linalg.norm(means[0] - means[1])), 3),
                                "along_named": round(float((means[0] - means[1]) @ named / (named @ named)), 4)}
    return record


def _text_metrics(ctx: StageContext) -> Optional[dict[str, Any]]:
    """Text-to-image: how the samples were prompted, and the probe record (`text_probe_record`) where the experiment
    has probe prompts; None for the other kinds."""
    from replication.config import ConditioningKind
    from replication.samples import load_sample_subset

    cond = ctx.root.conditioning
    if cond.kind is not ConditioningKind.text:
        return None
    record: dict[str, Any] = {"task": "text-to-image", "prompts": "sample i from the caption of evaluation image i "
                              f"(reference set, {ctx.typed.dataset.fid_reference.value})",
                              "caption_drop_prob": cond.caption_drop_prob}
    probes = read_json(ctx.run_dir / "sample" / "series.json").get("probes", [])
    if not probes:
        return record
    for p in probes:
        ctx.record_input(Path(p["dir"]) / "index.json")
    colours = [_mean_colours(Path(p["dir"])) for p in probes]
    prompts = [p["prompt"] for p in probes if p["prompt"]]
    record["probes"] = text_probe_record(prompts, colours[:len(prompts)], colours[len(prompts)])
    arrays = {}
    for k, p in enumerate(probes):
        n = min(PROBE_EXAMPLES, len(colours[k]))
        arrays["unconditional" if not p["prompt"] else f"prompt_{k:02d}"] = load_sample_subset(Path(p["dir"]), np.arange(n))
    arrays["prompts"] = np.array(prompts)
    path = ctx.stage_dir / PROBE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    record["examples"] = str(path.relative_to(ctx.run_dir))
    return record


FIRST_STAGE_PSNR_IMAGES = 256


def first_stage_psnr(ctx: StageContext) -> dict[str, Any]:
    """How well the run's autoencoder reconstructs (posterior mode): PSNR in dB, mean and std over the first
    FIRST_STAGE_PSNR_IMAGES images of the FID reference set, which names its split. What the latent model can reach
    is bounded by it, so a run's page states it beside its FID."""
    from replication.data.prepare import REFERENCE, open_prepared
    from replication.data.prepared import to_model_input
    from replication.metrics.reconstruction import psnr, summarize

    images = open_prepared(ctx.typed.dataset, REFERENCE)
    model = load_first_stage(ctx.run_dir, ctx.typed, ctx.device)
    n, values = min(len(images), FIRST_STAGE_PSNR_IMAGES), []
    with torch.no_grad():
        for start in range(0, n, ctx.typed.metrics.batch_size):
            batch = images.get_batch(np.arange(start, min(n, start + ctx.typed.metrics.batch_size)))
            x_rec, _ = model(to_model_input(batch).to(ctx.device), sample_posterior=False)
            orig = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
            values.extend(psnr(orig, to_uint8(x_rec).cpu()).tolist())
    return {**summarize(values), "unit": "dB", "images": n,
            "split": f"reference set ({ctx.typed.dataset.fid_reference.value})"}


def train_loss_curve(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loss curve of the training that produced the current weights, from the append-only stats: records after
    the last fresh start (an earlier training of another configuration is dropped), one per step (a step replayed
    after a resume keeps its latest record)."""
    begins = [i for i, r in enumerate(records) if r.get("event") == "train_begin" and r.get("resumed_from") is None]
    by_step: dict[int, float] = {}
    for r in records[begins[-1] if begins else 0:]:
        if r.get("event") == "train":
            by_step[int(r["step"])] = r["loss"]
    return [{"step": s, "loss": by_step[s]} for s in sorted(by_step)]


def _training_batch(ldm_meta: dict[str, Any]) -> dict[str, Any]:
    """The global batch and learning rate the LDM was trained with (the paper states both, Tab. 12-15), and how
    the EMA was updated when gradients were accumulated. Empty for imported weights."""
    trainer = ldm_meta.get("trainer")
    if not trainer:
        return {}
    accumulate = int(trainer.get("accumulate_grad_batches", 1))
    out = {"train_global_batch": int(trainer["batch_size"]) * int(ldm_meta.get("world_size", 1)) * accumulate,
           "train_lr": ldm_meta.get("lr")}
    if accumulate > 1:
        out["train_grad_accumulation"] = accumulate
        out["ema_update"] = ("every micro-batch (as the release)" if trainer.get("ema_every_micro_batch", True)
                             else "every optimizer step")
    return out


def _evaluate_autoencoder(ctx: StageContext) -> dict[str, Any]:
    from replication.data.prepare import REFERENCE, open_prepared
    from replication.data.prepared import to_model_input
    from replication.metrics.evaluate import evaluate_reconstructions
    from replication.metrics.reconstruction import ReconstructionAccumulator
    from replication.metrics.streaming import FeatureAccumulator

    m, dataset = ctx.typed.metrics, ctx.typed.dataset
    extractor = build_feature_extractor(ctx)
    split = REFERENCE  # Tab. 8 evaluates on ImageNet-val: the dataset config names the split (fid_reference)
    images = open_prepared(dataset, split)
    ctx.record_input(images.card_path)
    if (ctx.run_dir / AE_WEIGHTS).exists():
        ctx.record_input(ctx.run_dir / AE_WEIGHTS)
    model = load_first_stage(ctx.run_dir, ctx.typed, ctx.device)
    lpips_metric, lpips_standin = _lpips(ctx)
    recon = ReconstructionAccumulator(lpips_metric=lpips_metric)
    orig_acc, rec_acc = FeatureAccumulator(extractor), FeatureAccumulator(extractor)
    n = min(len(images), m.num_samples)
    with torch.no_grad():
        for start in range(0, n, m.batch_size):
            batch = images.get_batch(np.arange(start, min(n, start + m.batch_size)))
            x = to_model_input(batch).to(ctx.device)
            x_rec, _ = model(x, sample_posterior=False)  # posterior mode, as reconstructions are evaluated
            orig = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).contiguous()
            rec = to_uint8(x_rec).cpu()
            recon.add(orig, rec)
            orig_acc.add(orig)
            rec_acc.add(rec)
    res = evaluate_reconstructions(orig_acc.result(), rec_acc.result(), recon.per_image(), m, extractor, lpips_standin)
    reasons = _reasons(ctx, res["not_comparable_reasons"])
    return {"schema_version": SCHEMA_VERSION, "experiment": ctx.root.name, "autoencoder": ctx.typed.autoencoder.name,
            "f": int(getattr(model, "downsampling_factor", 1)), "comparable": not reasons,
            "not_comparable_reasons": reasons, "metrics": res["metrics"], "n_images": res["n_images"],
            "paper": {"name": ctx.root.paper.name} if ctx.root.paper.name else None,  # key into autoencoders.csv
            "protocol": {**res["protocol"], "split": split, "dataset": dataset.name}}


def _lpips(ctx: StageContext):
    from replication.metrics.reconstruction import build_lpips

    m = ctx.typed.metrics
    metric = build_lpips(m.lpips_vgg_weights, allow_standin=m.allow_standin, device=ctx.device)
    return metric, bool(metric.is_standin)


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v["value"] for k, v in metrics["metrics"].items() if isinstance(v, dict) and v.get("value") is not None}


def _body(ctx: StageContext) -> dict[str, Any]:
    if ctx.root.kind == ExperimentKind.autoencoder:
        metrics, name = _evaluate_autoencoder(ctx), RECON_METRICS_FILE
    else:
        metrics, name = _evaluate_ldm(ctx), METRICS_FILE
    atomic_write_json(ctx.run_dir / name, metrics)
    atomic_write_json(ctx.run_dir / "metrics_flat.json", _flat(metrics))
    (ctx.stage_dir).mkdir(parents=True, exist_ok=True)
    ctx.stats(event="evaluated", **_flat(metrics))
    outputs = [ctx.run_dir / name, ctx.run_dir / "metrics_flat.json"]
    if "task" in metrics:
        outputs.append(ctx.run_dir / metrics["task"]["examples"])
    return {"metrics": _flat(metrics), "comparable": metrics["comparable"], "outputs": outputs}


def run(cfg: DictConfig) -> dict[str, Any]:
    return execute(STAGE, cfg, _body)


main = hydra_entry(run)

if __name__ == "__main__":
    main()
