"""Classifier guidance through the stages (LDM-8-G, Tab. 10): the classifier config group, the train_classifier
stage on a real latent cache (its loss falls, it learns the classes, it is skipped when up to date and disabled
without a classifier), sampling guided by it (different samples at scale > 0, the unguided ones at scale 0), the
samples key and fingerprints that follow it, and smoke_cin_cg end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline_helpers import paths_overrides, read_jsonl, run_module
from replication.config import STAGES, ConfigError, validate_config
from replication.data.latents import LatentDataset, encode_to_cache
from replication.data.prepared import PreparedImages, write_prepared
from replication.stages.artifacts import (AE_WEIGHTS, CLASSIFIER_META, CLASSIFIER_WEIGHTS, LDM_META,
                                          build_first_stage, build_unet, load_classifier)
from replication.stages.entry import CONFIG_DIR, compose
from replication.utils.io import atomic_write_json, save_tensors

EXPERIMENT = "smoke_cin_cg"
LEVELS = (40, 128, 215)  # class k: an image of grey level LEVELS[k] with a little noise
SCALE_FACTOR = 0.8  # the trained LDM's scale_factor, as train_ldm's meta.json records it


def class_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """32x32 images whose class is their brightness: a classifier can tell them apart, so its loss must fall."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(LEVELS)
    base = np.asarray(LEVELS, dtype=np.float64)[labels][:, None, None, None]
    images = np.clip(base + rng.normal(0.0, 12.0, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return images, labels


def pooled_moments(x: torch.Tensor) -> torch.Tensor:
    """The cache's KL moments of an image: mean = the image averaged to the 8x8 latent (its 3 channels and their mean
    as the 4th), log-variance -12 (posterior samples are the mean up to 2.5e-3)."""
    mean = torch.nn.functional.avg_pool2d(x, 4)
    mean = torch.cat([mean, mean.mean(1, keepdim=True)], dim=1)
    return torch.cat([mean, torch.full_like(mean, -12.0)], dim=1)


def tiny_run(work: Path, *overrides: str, images: int = 48):
    """A run folder of smoke_cin_cg holding what train_classifier reads, made without training anything: prepared
    class images, their latent cache (encode_to_cache, with flips and labels), the smoke autoencoder at its seeded
    initialisation (the stage loads it to sample KL latents from the moments) and train_ldm's meta.json."""
    cfg = compose([f"experiment={EXPERIMENT}", *paths_overrides(work), "cpu_threads=1", "device=cpu", *overrides])
    typed = validate_config(cfg)
    run_dir = work / "runs" / EXPERIMENT
    imgs, labels = class_images(images, seed=0)
    prepared = work / "prepared_tiny"
    write_prepared(((f"k{i}", imgs[i], int(labels[i])) for i in range(len(imgs))), prepared,
                   {"spec_hash": "tiny-classes", "flip_train": True}, progress=False)
    encode_to_cache(pooled_moments, PreparedImages(prepared), run_dir / "encode_latents" / "train.latents",
                    batch_size=16, flips=True, progress=False)
    torch.manual_seed(0)
    save_tensors(run_dir / AE_WEIGHTS, build_first_stage(typed).state_dict())
    atomic_write_json(run_dir / LDM_META, {"scale_factor": SCALE_FACTOR})
    return cfg, typed, run_dir


def train_stage(cfg):
    from replication.stages import train_classifier

    return train_classifier.run(cfg)


STEPS = ["classifier.steps=60", "classifier.batch_size=16", "classifier.lr=3.0e-3", "classifier.log_every=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread_module):
    work = tmp_path_factory.mktemp("classifier_stage")
    cfg, typed, run_dir = tiny_run(work, *STEPS)
    result = train_stage(cfg)
    return work, cfg, typed, run_dir, result


@pytest.fixture(scope="module")
def one_thread_module():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_the_stage_sits_between_train_ldm_and_sample():
    assert STAGES.index("train_ldm") < STAGES.index("train_classifier") < STAGES.index("sample")
    for name in (EXPERIMENT, "imagenet_cin_ldm8_g"):
        typed = validate_config(compose([f"experiment={name}"]))
        assert "train_classifier" in typed.root.stages and typed.classifier.enabled
        assert typed.sampler.classifier_scale > 0
    ldm8 = validate_config(compose(["experiment=imagenet_cin_ldm8_g"]))
    assert (ldm8.sampler.steps, ldm8.sampler.eta, ldm8.sampler.classifier_scale, ldm8.sampler.guidance_scale) == \
        (200, 1.0, 10.0, 1.0)  # Tab. 10 LDM-8-G: 200 DDIM steps, eta 1 (README), classifier scale 10, no cfg
    assert (ldm8.classifier.model.image_size, ldm8.classifier.model.in_channels) == (32, 4)  # the f=8 latent
    text = (CONFIG_DIR / "experiment" / "imagenet_cin_ldm8_g.yaml").read_text()
    assert "Table 10" in text and "LDM-8-G" in text and "7.76" in text


def test_smoke_cin_cg_can_link_the_stages_of_a_smoke_cin_run():
    """smoke_cin_cg's stages up to train_ldm have smoke_cin's config subsets, so `reuse_from=smoke_cin` links them."""
    from replication.stages.fingerprint import STAGE_DEPS, _fingerprint_value

    ours, theirs = compose([f"experiment={EXPERIMENT}"]), compose(["experiment=smoke_cin"])
    for stage in ("prepare", "train_autoencoder", "encode_latents", "train_ldm"):
        for key in STAGE_DEPS[stage][0]:
            assert _fingerprint_value(ours, key) == _fingerprint_value(theirs, key), (stage, key)


def test_the_stage_trains_on_the_latent_cache_and_its_loss_falls(trained):
    work, cfg, typed, run_dir, result = trained
    assert result["skipped"] is False and result["steps"] == 60 and result["latents"] == 48
    assert result["scale_factor"] == SCALE_FACTOR
    stats = [r for r in read_jsonl(run_dir / "train_classifier" / "stats.jsonl") if r.get("event") == "train"]
    losses = [r["loss"] for r in stats]
    assert [r["step"] for r in stats] == list(range(1, 61))
    assert losses[0] == pytest.approx(math.log(3.0), abs=1e-5)  # zero-initialised head: uniform over 3 classes
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses  # about 1.04 -> 0.69
    meta = json.loads((run_dir / CLASSIFIER_META).read_text())
    assert meta["classifier"]["name"] == "smoke" and meta["steps"] == 60 and meta["last_loss"] == losses[-1]
    assert (run_dir / "train_classifier" / "done.json").is_file()
    log = (run_dir / "train_classifier" / "log.txt").read_text()
    assert "train classifier" in log and "loss" in log  # progress lines, as the other trainers write them

    # what it learned: the classes of the cached latents at low noise, from the saved weights
    classifier = load_classifier(run_dir, typed, torch.device("cpu"))
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())
    cache = LatentDataset(run_dir / "encode_latents" / "train.latents")
    z0 = cache.get(np.arange(len(cache)))[:, :4] * SCALE_FACTOR  # the mean: log-variance -12
    with torch.no_grad():
        logits = classifier(z0, torch.full((len(cache),), 20, dtype=torch.long))
    accuracy = float((logits.argmax(1).numpy() == cache.labels).mean())
    assert accuracy > 0.9, accuracy


def test_the_stage_is_skipped_when_up_to_date_and_runs_again_when_its_inputs_change(trained, tmp_path):
    import shutil

    from replication.stages.fingerprint import fingerprint

    work, cfg, typed, run_dir, first = trained
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    cfg = compose([f"experiment={EXPERIMENT}", *paths_overrides(copy), "cpu_threads=1", "device=cpu", *STEPS])
    run_dir = copy / "runs" / EXPERIMENT
    again = train_stage(cfg)
    assert again["skipped"] is True and again["last_loss"] == first["last_loss"]
    # sampling settings are not the classifier's: it stays up to date
    assert train_stage(compose([f"experiment={EXPERIMENT}", *paths_overrides(copy), "cpu_threads=1", "device=cpu",
                                *STEPS, "sampler.classifier_scale=3.0"]))["skipped"] is True

    weights = run_dir / CLASSIFIER_WEIGHTS
    before = weights.read_bytes()
    damaged = bytearray(before)
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    remade = train_stage(cfg)  # a damaged weights file does not match its record: trained again, the same
    assert remade["skipped"] is False and weights.read_bytes() == before

    # its own settings and its upstream stages are in its fingerprint
    other = compose([f"experiment={EXPERIMENT}", *paths_overrides(copy), "cpu_threads=1", "device=cpu",
                     *STEPS, "classifier.lr=5.0e-4"])
    assert fingerprint("train_classifier", other) != fingerprint("train_classifier", cfg)
    key = fingerprint("train_classifier", cfg)
    (run_dir / "train_ldm").mkdir(exist_ok=True)
    atomic_write_json(run_dir / "train_ldm" / "done.json", {"content_id": "another LDM"})
    assert fingerprint("train_classifier", cfg) != key
    with pytest.raises(Exception, match="other classifier settings"):  # weights of other settings are refused
        load_classifier(run_dir, validate_config(other), torch.device("cpu"))


def test_without_a_classifier_the_stage_records_itself_disabled(tmp_path):
    from replication.stages.fingerprint import upstream_ids

    cfg = compose(["experiment=smoke_cin", *paths_overrides(tmp_path), "cpu_threads=1", "device=cpu"])
    assert validate_config(cfg).classifier.enabled is False
    result = train_stage(cfg)
    assert result["mode"].startswith("disabled") and result["skipped"] is False
    stage = tmp_path / "runs" / "smoke_cin" / "train_classifier"
    assert (stage / "done.json").is_file() and not (stage / "classifier.safetensors").exists()
    assert train_stage(cfg)["skipped"] is True
    # unguided sampling does not depend on the (disabled) classifier stage
    assert "upstream:train_classifier" not in upstream_ids("sample", cfg)


def test_sample_fingerprint_and_samples_key_follow_the_classifier_only_when_it_guides(trained, tmp_path):
    import shutil

    from replication.stages.context import StageContext
    from replication.stages.fingerprint import fingerprint
    from replication.stages.sample import _samples_key

    work, *_ = trained
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    run_dir = copy / "runs" / EXPERIMENT

    def cfg_at(scale: float, classifier: str = "smoke"):
        steps = STEPS if classifier != "none" else []
        return compose([f"experiment={EXPERIMENT}", *paths_overrides(copy), "device=cpu", f"classifier={classifier}",
                        *steps, f"sampler.classifier_scale={scale}"])

    def key(cfg) -> str:
        typed = validate_config(cfg)
        ctx = StageContext(name="sample", cfg=cfg, typed=typed, run_dir=run_dir, stage_dir=run_dir / "sample",
                           device=torch.device("cpu"), progress=False)
        return _samples_key(ctx)(10, "main")

    done = run_dir / "train_classifier" / "done.json"
    record = json.loads(done.read_text())
    guided, unguided = cfg_at(10.0), cfg_at(0.0)
    before = {"guided": (fingerprint("sample", guided), key(guided)),
              "unguided": (fingerprint("sample", unguided), key(unguided))}
    assert before["guided"] != before["unguided"] and key(cfg_at(3.0)) != key(guided)
    assert key(cfg_at(0.0, "none")) == key(unguided)  # unguided samples: the classifier setting is not in the key
    done.write_text(json.dumps({**record, "content_id": "a retrained classifier"}))
    assert fingerprint("sample", guided) != before["guided"][0] and key(guided) != before["guided"][1]
    assert (fingerprint("sample", unguided), key(unguided)) == before["unguided"]


def test_guided_samples_differ_from_unguided_ones_and_equal_them_at_scale_zero(trained):
    from replication.stages.sample import Generator

    _, _, _, run_dir, _ = trained

    def generator(scale: float, with_classifier: bool = True) -> Generator:
        typed = validate_config(compose([f"experiment={EXPERIMENT}", "device=cpu", *STEPS, "sampler.steps=4",
                                         "sampler.eta=0.0", f"sampler.classifier_scale={scale}"]))
        torch.manual_seed(0)
        unet, first_stage = build_unet(typed).eval(), build_first_stage(typed).eval()
        classifier = load_classifier(run_dir, typed, torch.device("cpu")) if with_classifier else None
        return Generator(unet, first_stage, SCALE_FACTOR, typed, torch.device("cpu"), classifier=classifier)

    idx = np.arange(6)
    plain = generator(0.0, with_classifier=False)(idx, 4)
    assert np.array_equal(generator(0.0)(idx, 4), plain)  # scale 0: the classifier is not consulted
    guided_gen = generator(10.0)
    params = {k: v.clone() for k, v in guided_gen.classifier.state_dict().items()}
    guided = guided_gen(idx, 4)
    assert guided.shape == plain.shape and guided.dtype == np.uint8
    assert np.abs(guided.astype(int) - plain.astype(int)).mean() > 1.0
    assert np.array_equal(guided_gen(idx, 4), guided)  # per-sample seeds: guided sampling repeats exactly
    assert not guided_gen.classifier.training
    assert all(torch.equal(v, params[k]) for k, v in guided_gen.classifier.state_dict().items())
    with pytest.raises(Exception, match="no classifier was given"):
        generator(10.0, with_classifier=False)(idx, 4)


def _cfg(*overrides: str):
    return compose([f"experiment={EXPERIMENT}", *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["classifier=none"], "sampler.classifier_scale=10 guides with a noisy-latent classifier, but classifier is none"),
    (["sampler.classifier_scale=-1.0"], "sampler.classifier_scale must be >= 0"),
    (["classifier.model.image_size=16"], "reads 4x16x16 latents but the LDM's latent is 4x8x8"),
    (["classifier.model.in_channels=3"], "reads 3x8x8 latents"),
    (["classifier.model.num_classes=5"], "classifier.model.num_classes=5 but conditioning.num_classes=3"),
    (["classifier.model.channel_mult=[2,2]"], "classifier.model.channel_mult must start with 1"),
    (["classifier.model.pool=max"], "classifier.model.pool must be one of"),
    (["+classifier.model.depth=3"], "classifier.model.depth"),
    (["+classifier.stepz=3"], "classifier.stepz"),
    (["classifier.steps=0"], "classifier.steps must be >= 1"),
    (["classifier.steps=null"], "classifier.steps is required"),
    (["classifier.lr=0.0"], "classifier.lr"),
    (["classifier.weight_decay=nan"], "classifier.weight_decay=nan: config values must be finite"),
    (["classifier=none", "sampler.classifier_scale=0.0", "+classifier.steps=5"],
     "classifier.steps is set but classifier.model is null"),
    (["conditioning.kind=none", "unet.use_spatial_transformer=false", "unet.context_dim=null"],
     "conditioning.kind must be class_label or class_embed"),
    (["trainer.use_latent_cache=false"], "trains on the encode_latents cache"),
    (["trainer.pretrained=/w/model.ckpt"], "trains on the encode_latents cache"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate_config(_cfg(*overrides))


def test_a_config_without_the_classifier_group_reads_as_none():
    cfg = compose(["experiment=smoke_cin"])
    OmegaConf.set_struct(cfg, False)
    del cfg["classifier"]
    typed = validate_config(cfg)
    assert typed.classifier.enabled is False and typed.sampler.classifier_scale == 0.0


@pytest.mark.e2e
def test_smoke_cin_cg_end_to_end(tmp_path):
    """experiment=smoke_cin_cg through python -m replication.run: the classifier trains after the LDM on its cached
    latents and guides the samples that the evaluation scores and the report places next to Tab. 10 LDM-8-G."""
    import time

    start = time.perf_counter()
    run_module("replication.run", [f"experiment={EXPERIMENT}", *paths_overrides(tmp_path), "cpu_threads=1"])
    seconds = time.perf_counter() - start
    run = tmp_path / "runs" / EXPERIMENT
    done = json.loads((run / "train_classifier" / "done.json").read_text())
    assert done["result"]["steps"] == 200 and done["result"]["last_loss"] < math.log(3.0)
    assert any(f.endswith("classifier.safetensors") for f in done["files"])
    meta = json.loads((run / "train_ldm" / "meta.json").read_text())
    assert done["result"]["scale_factor"] == meta["scale_factor"]  # the LDM's latent scale
    sample_done = json.loads((run / "sample" / "done.json").read_text())
    manifest = json.loads((run / "sample" / "manifest.json").read_text())
    assert any(p.endswith(CLASSIFIER_WEIGHTS.split("/")[-1]) for p in manifest["inputs"])
    assert sample_done["result"]["samples"]["num_samples"] == 128
    samples = np.concatenate([np.load(p) for p in sorted((run / "sample" / "samples").glob("shard_*.npy"))])
    assert samples.shape == (128, 32, 32, 3) and samples.std() > 1.0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["comparable"] is False and math.isfinite(metrics["metrics"]["FID"]["value"])
    table = (tmp_path / "reports" / f"{EXPERIMENT}.md").read_text()
    assert "LDM-8-G" in table and "NOT COMPARABLE" in table.upper()
    print(f"smoke_cin_cg end to end: {seconds:.0f} s")
