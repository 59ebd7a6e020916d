"""The Python API (replication.api) and the model zoo (replication.pretrained), against real files and a real
HTTP server on 127.0.0.1: a tiny model of the smoke experiments saved in the release's checkpoint layout (zipped
as the release ships it), fetched by zoo name, verified, resumed, refused when damaged, loaded and sampled."""
from __future__ import annotations

import hashlib
import io
import re
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

try:
    from data_fixtures import http_server
except ImportError:  # tests/ imported as a package
    from tests.data_fixtures import http_server

from replication.api import Pretrained, load_pretrained, sample
from replication.config import validate_config
from replication.models.compvis import CheckpointMismatchError
from replication.models.ema import shadow_name
from replication.pretrained import (CHECKPOINT_FILE, COLUMNS, RECORD_FILE, PretrainedError, archive_path, fetch, main,
                                    read_zoo, zoo_entry)
from replication.stages.artifacts import build_first_stage, build_unet
from replication.stages.entry import CONFIG_DIR, compose

REPO = Path(__file__).resolve().parents[1]
RELEASE_MODELS = {"kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f8", "vq-f16", "celeba", "ffhq", "lsun_churches",
                  "lsun_bedrooms", "cin", "sr_bsr", "inpainting_big", "semantic_synthesis", "layout2img", "text2img"}


def _release_layout(experiment: str, seed: int = 0, ema: bool = True, first_stage_only: bool = False):
    """A state dict named as the release's LatentDiffusion (or, `first_stage_only`, as its first-stage training
    module with loss.* tensors) for the tiny networks of `experiment`, and the tensors each part must receive.
    Weights are perturbed away from their initialisation (the U-Net's zero-initialised output layer included), so
    samples depend on the U-Net, the EMA weights and the class labels."""
    typed = validate_config(compose([f"experiment={experiment}"]))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def jitter(state):
        return {k: v + 0.2 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                for k, v in state.items()}

    first = jitter(build_first_stage(typed).state_dict())
    if first_stage_only:
        return {**first, "loss.logvar": torch.zeros(())}, {"first": first}
    denoiser = build_unet(typed)
    unet_module = getattr(denoiser, "diffusion_model", denoiser)
    raw = jitter(unet_module.state_dict())
    want = {"first": first, "raw": raw, "ema": jitter(raw)}
    sd = {f"model.diffusion_model.{k}": v for k, v in raw.items()}
    if ema:
        sd.update({f"model_ema.{shadow_name('diffusion_model.' + k)}": v for k, v in want["ema"].items()})
        sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})
    if hasattr(denoiser, "cond_stage_model"):
        want["cond"] = jitter(denoiser.cond_stage_model.state_dict())
        sd.update({f"cond_stage_model.{k}": v for k, v in want["cond"].items()})
    sd.update({f"first_stage_model.{k}": v for k, v in first.items()})
    sd["betas"] = typed.diffusion.make_schedule().betas.float()
    sd["scale_factor"] = torch.tensor(0.75)
    return sd, want


def _save_ckpt(path: Path, sd) -> Path:
    torch.save({"state_dict": sd, "global_step": 3, "epoch": 1}, path)  # a Lightning checkpoint's top level
    return path


def _zip(path: Path, ckpt: Path, member: str = CHECKPOINT_FILE) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(ckpt, member)
        zf.writestr("config.yaml", "model: {}\n")  # the release's zips hold the config beside the checkpoint
    return path


def _write_zoo(path: Path, rows: list[dict]) -> Path:
    lines = [",".join(COLUMNS)]
    for row in rows:
        full = {"kind": "ldm", "archive": "zip", "member": CHECKPOINT_FILE, "experiment": "smoke", "bytes": "",
                "sha256": "", "source": "test", "notes": "", **row}
        lines.append(",".join(str(full[c]) for c in COLUMNS))
    path.write_text("\n".join(lines) + "\n")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_tensors(module: torch.nn.Module, want: dict) -> bool:
    got = module.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Served files: smoke.zip (release layout, model.ckpt inside), smoke.ckpt (bare) and their expected tensors;
    smoke_cin.ckpt for the class-conditional path; smoke_noema.ckpt without EMA weights."""
    root = tmp_path_factory.mktemp("released")
    sd, want = _release_layout("smoke")
    ckpt = _save_ckpt(root / "smoke.ckpt", sd)
    _zip(root / "smoke.zip", ckpt)
    sd_cin, want_cin = _release_layout("smoke_cin", seed=1)
    _save_ckpt(root / "smoke_cin.ckpt", sd_cin)
    sd_noema, _ = _release_layout("smoke", ema=False)
    _save_ckpt(root / "smoke_noema.ckpt", sd_noema)
    return {"root": root, "want": want, "want_cin": want_cin}


@pytest.fixture(scope="module")
def smoke_model(released):
    return load_pretrained(released["root"] / "smoke.ckpt", experiment="smoke")


@pytest.fixture(scope="module")
def cin_model(released):
    return load_pretrained(released["root"] / "smoke_cin.ckpt", experiment="smoke_cin")


# ---------------------------------------------------------------------------------------------------------
# The zoo file of the repository
# ---------------------------------------------------------------------------------------------------------
def test_zoo_lists_the_release_with_sources_and_existing_experiments():
    zoo = read_zoo()
    assert RELEASE_MODELS <= set(zoo), RELEASE_MODELS - set(zoo)
    for entry in zoo.values():
        assert entry.url.startswith("https://") and "CompVis/latent-diffusion" in entry.source, entry
        assert entry.archive in ("zip", "ckpt") and (entry.archive == "zip" or not entry.member), entry
    assert zoo["cin256-v2"].archive == "ckpt" and zoo["kl-f8"].member == CHECKPOINT_FILE
    # each named experiment builds the kind of model the row holds
    for entry in zoo.values():
        if entry.experiment:
            kind = validate_config(compose([f"experiment={entry.experiment}"])).root.kind.value
            assert kind == ("autoencoder" if entry.kind == "first_stage" else "ldm"), entry
    assert {e.experiment for e in zoo.values() if e.kind == "ldm" and e.experiment} == {
        "celebahq_ldm4", "ffhq_ldm4", "lsun_churches_ldm8", "lsun_bedrooms_ldm4", "imagenet_cin_ldm4_cfg",
        "sr_bsr_release", "inpainting_big_release"}


# zoo row -> tests/reference/compvis_modules dump of the released module (name -> shape of every tensor)
RELEASE_DUMPS = {**{n: f"ae-{n}" for n in ("kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8",
                                             "vq-f8-n256", "vq-f16")},
                 "celeba": "ldm-celeba256", "ffhq": "ldm-ffhq256", "lsun_churches": "ldm-lsun_churches256",
                 "lsun_bedrooms": "ldm-lsun_beds256", "cin256-v2": "cfg-cin256-v2", "cin": "ldm-cin256",
                 "sr_bsr": "ldm-bsr_sr", "inpainting_big": "ldm-inpainting_big"}
# rows without an experiment of their own whose notes name one with overrides
NOTED_EXPERIMENTS = {"cin": ("imagenet_ldm8", ["conditioning.n_embed_classes=1000"])}


@pytest.mark.parametrize("name", sorted(RELEASE_DUMPS))
def test_each_zoo_experiment_builds_the_released_tensor_names_and_shapes(name):
    """What load_pretrained checks for a real download, against the released modules' tensor listings: the zoo
    row's experiment builds a U-Net and an encoder/decoder with exactly the release's names and shapes."""
    import json

    entry = read_zoo()[name]
    dump = json.loads((REPO / "tests" / "reference" / "compvis_modules" / f"{RELEASE_DUMPS[name]}.json").read_text())
    ref = {k: tuple(v) for k, v in dump["state_dict"].items()}
    experiment, overrides = NOTED_EXPERIMENTS.get(name, (entry.experiment, []))
    assert experiment == entry.experiment or all(word in entry.notes for word in [experiment, *overrides])
    typed = validate_config(compose([f"experiment={experiment}", *overrides]))
    with torch.device("meta"):
        first = build_first_stage(typed)
        denoiser = build_unet(typed) if entry.kind == "ldm" else None
    prefix = "first_stage_model." if entry.kind == "ldm" else ""
    ours = {prefix + k: tuple(v.shape) for k, v in first.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    if denoiser is not None:
        unet = getattr(denoiser, "diffusion_model", denoiser)
        ours.update({f"model.diffusion_model.{k}": tuple(v.shape) for k, v in unet.state_dict().items()})
    assert ours == ref, sorted(set(ours.items()) ^ set(ref.items()))[:10]


def test_a_zoo_row_naming_a_missing_experiment_is_refused(tmp_path):
    zoo = _write_zoo(tmp_path / "zoo.csv", [{"name": "x", "url": "http://127.0.0.1:9/x.zip", "experiment": "nope"}])
    with pytest.raises(PretrainedError, match=r"line 2 \(x\): experiment 'nope' is not in"):
        read_zoo(zoo)


# ---------------------------------------------------------------------------------------------------------
# Fetching by zoo name
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("archive", ["zip", "ckpt"])
def test_zoo_name_downloads_verifies_caches_and_loads(released, tmp_path, archive):
    served = released["root"] / f"smoke.{archive}"
    cache = tmp_path / "cache"
    with http_server(released["root"]) as (url, state):
        zoo = _write_zoo(tmp_path / "zoo.csv", [{"name": "tiny", "url": f"{url}/{served.name}", "archive": archive,
                                                  "member": CHECKPOINT_FILE if archive == "zip" else "",
                                                  "bytes": served.stat().st_size, "sha256": _sha256(served)}])
        model = load_pretrained("tiny", zoo=zoo, cache_dir=cache, progress=False)
        assert len(state["requests"]) == 1
        again = load_pretrained("tiny", zoo=zoo, cache_dir=cache, progress=False)
        assert len(state["requests"]) == 1  # the second use reads the verified cache
    want = released["want"]
    assert isinstance(model, Pretrained) and model.experiment == "smoke" and model.ema
    assert _same_tensors(model.unet, want["ema"]) and _same_tensors(model.autoencoder, want["first"])
    assert model.cond_stage is None and model.scale_factor == pytest.approx(0.75)
    assert _same_tensors(again.unet, want["ema"])
    folder = cache / "tiny"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CHECKPOINT_FILE, RECORD_FILE, ".lock"] + (["unpacked"] if archive == "zip" else []))  # the zip is not kept
    record = OmegaConf.load(folder / RECORD_FILE)
    assert record.archive_sha256 == _sha256(served)
    assert record.checkpoint_sha256 == _sha256(released["root"] / "smoke.ckpt")


def test_first_download_records_the_hash_and_a_changed_cache_is_refused(released, tmp_path):
    cache = tmp_path / "cache"
    with http_server(released["root"]) as (url, _):
        zoo = _write_zoo(tmp_path / "zoo.csv", [{"name": "tiny", "url": f"{url}/smoke.zip"}])  # no size, no hash
        path = fetch("tiny", cache_dir=cache, zoo=zoo, progress=False)
    record = OmegaConf.load(cache / "tiny" / RECORD_FILE)
    assert record.archive_sha256 == _sha256(released["root"] / "smoke.zip")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match=re.escape(f"{path} differs from what was downloaded")):
        load_pretrained("tiny", zoo=zoo, cache_dir=cache, progress=False)


def test_a_corrupted_download_is_refused_naming_the_file(released, tmp_path):
    good = released["root"] / "smoke.zip"
    served = tmp_path / "srv"
    served.mkdir()
    data = bytearray(good.read_bytes())
    data[100] ^= 0xFF
    (served / "smoke.zip").write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with http_server(served) as (url, _):
        zoo = _write_zoo(tmp_path / "zoo.csv", [{"name": "tiny", "url": f"{url}/smoke.zip", "sha256": _sha256(good)}])
        with pytest.raises(PretrainedError) as err:
            load_pretrained("tiny", zoo=zoo, cache_dir=cache, progress=False)
    part = f"{archive_path(zoo_entry('tiny', zoo), cache)}.part"
    assert "sha256 mismatch" in str(err.value) and part in str(err.value) and f"{url}/smoke.zip" in str(err.value)
    assert not (cache / "tiny" / CHECKPOINT_FILE).exists() and not Path(part).exists()


def test_a_partial_download_is_resumed(released, tmp_path):
    good = released["root"] / "smoke.zip"
    cache = tmp_path / "cache"
    with http_server(released["root"]) as (url, state):
        zoo = _write_zoo(tmp_path / "zoo.csv", [{"name": "tiny", "url": f"{url}/smoke.zip", "sha256": _sha256(good)}])
        part = Path(f"{archive_path(zoo_entry('tiny', zoo), cache)}.part")
        part.parent.mkdir(parents=True)
        half = good.stat().st_size // 2
        part.write_bytes(good.read_bytes()[:half])  # what an interrupted fetch leaves
        model = load_pretrained("tiny", zoo=zoo, cache_dir=cache, progress=False)
    assert [r["range"] for r in state["requests"]] == [f"bytes={half}-"]
    assert _same_tensors(model.unet, released["want"]["ema"])


def test_offline_the_message_says_where_to_put_the_file(tmp_path):
    with http_server(tmp_path) as (url, _):
        pass  # the port is closed again: nothing listens there
    zoo = _write_zoo(tmp_path / "zoo.csv", [{"name": "tiny", "url": f"{url}/smoke.zip"}])
    with pytest.raises(PretrainedError) as err:
        fetch("tiny", cache_dir=tmp_path / "cache", zoo=zoo, progress=False, retries=0)
    text = str(err.value)
    assert f"{url}/smoke.zip" in text and str(tmp_path / "cache" / "tiny" / "tiny.zip") in text and "place it" in text


def test_a_zoo_model_without_an_experiment_asks_for_one(tmp_path):
    zoo = _write_zoo(tmp_path / "zoo.csv", [{"name": "t2i", "url": "http://127.0.0.1:9/t.zip", "experiment": "",
                                             "notes": "no text encoder"}])
    with pytest.raises(PretrainedError, match="'t2i' has no experiment.*no text encoder.*experiment=NAME"):
        load_pretrained("t2i", zoo=zoo, cache_dir=tmp_path / "cache")
    with pytest.raises(PretrainedError, match="neither an existing file or folder nor a model of the zoo"):
        load_pretrained("nothing-of-that-name", zoo=zoo)


def test_cli_lists_and_fetches(released, tmp_path):
    cache = tmp_path / "cache"
    with http_server(released["root"]) as (url, _):
        zoo = _write_zoo(tmp_path / "zoo.csv", [{"name": "tiny", "url": f"{url}/smoke.zip"}])
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["--zoo", str(zoo), "--cache", str(cache), "fetch", "tiny"]) == 0
            assert main(["--zoo", str(zoo), "--cache", str(cache), "list"]) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == str(cache / "tiny" / CHECKPOINT_FILE)
    assert lines[1].split()[:4] == ["tiny", "ldm", "smoke", "cached"]


# ---------------------------------------------------------------------------------------------------------
# Loading paths and their checks
# ---------------------------------------------------------------------------------------------------------
def test_ema_or_raw_weights(released, smoke_model):
    raw = load_pretrained(released["root"] / "smoke.ckpt", experiment="smoke", ema=False)
    assert not raw.ema and _same_tensors(raw.unet, released["want"]["raw"])
    assert smoke_model.ema and _same_tensors(smoke_model.unet, released["want"]["ema"])
    with pytest.raises(CheckpointMismatchError, match="holds no EMA weights.*ema=False"):
        load_pretrained(released["root"] / "smoke_noema.ckpt", experiment="smoke")


def test_class_conditional_model_loads_its_embedder(released, cin_model):
    want = released["want_cin"]
    assert _same_tensors(cin_model.cond_stage, want["cond"]) and _same_tensors(cin_model.unet, want["ema"])
    assert cin_model.num_classes == 3 and cin_model.sampler.guidance_scale == 1.5


def test_a_checkpoint_of_another_model_is_refused(released, tmp_path):
    with pytest.raises(CheckpointMismatchError, match="match no U-Net parameter"):  # another U-Net
        load_pretrained(released["root"] / "smoke_cin.ckpt", experiment="smoke")
    sd, _ = _release_layout("smoke")
    with_embedder = {**sd, "cond_stage_model.embedding.weight": torch.zeros(4, 32)}
    with pytest.raises(CheckpointMismatchError, match="conditioning model.*unconditional"):
        load_pretrained(_save_ckpt(tmp_path / "cond.ckpt", with_embedder), experiment="smoke")
    sd["betas"] = sd["betas"] * 1.1
    with pytest.raises(CheckpointMismatchError, match="another noise schedule"):
        load_pretrained(_save_ckpt(tmp_path / "other.ckpt", sd), experiment="smoke")
    with pytest.raises(PretrainedError, match="name the experiment"):
        load_pretrained(released["root"] / "smoke.ckpt")
    with pytest.raises(PretrainedError, match="experiment 'nope' is not in"):
        load_pretrained(released["root"] / "smoke.ckpt", experiment="nope")


def test_first_stage_checkpoint_loads_alone(tmp_path):
    sd, want = _release_layout("smoke_ae", first_stage_only=True)
    ckpt = _save_ckpt(tmp_path / "ae.ckpt", sd)
    model = load_pretrained(ckpt, experiment="smoke_ae", device="cpu")
    assert model.denoiser is None and _same_tensors(model.autoencoder, want["first"])
    with pytest.raises(PretrainedError, match="no U-Net to sample from"):
        sample(model, 1)


def test_build_autoencoder_needs_only_the_architecture():
    from replication.models.autoencoder import build_autoencoder
    from replication.models.autoencoder_config import validate_autoencoder_cfg

    cfg = OmegaConf.load(CONFIG_DIR / "autoencoder" / "smoke_kl.yaml")
    arch = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("loss", "train")])
    model = build_autoencoder(arch)
    assert model.encode_moments(torch.zeros(1, 3, 32, 32)).shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match="kind 'kl' needs 'loss'"):  # training still needs them
        validate_autoencoder_cfg(arch)
    bad = OmegaConf.merge(cfg, {"train": {"steps": 0}})
    with pytest.raises(ValueError, match="train.steps must be >= 1"):  # a section that is there is checked
        build_autoencoder(bad)
    with pytest.raises(ValueError, match="needs 'ddconfig'"):
        build_autoencoder(OmegaConf.masked_copy(arch, [k for k in arch if k != "ddconfig"]))


def test_run_folder_loads_verified_and_equal_to_the_checkpoint(released, smoke_model, tmp_path):
    from replication.stages import train_autoencoder, train_ldm

    ckpt = released["root"] / "smoke.ckpt"
    cfg = compose(["experiment=smoke", f"runs_root={tmp_path / 'runs'}", f"data_root={tmp_path / 'data'}",
                   "progress=false", f"autoencoder.pretrained={ckpt}", f"trainer.pretrained={ckpt}"])
    train_autoencoder.run(cfg)
    train_ldm.run(cfg)
    run_dir = tmp_path / "runs" / "smoke"
    model = load_pretrained(run_dir)  # built from the run's own config.yaml
    assert _same_tensors(model.unet, released["want"]["ema"]) and model.scale_factor == pytest.approx(0.75)
    assert np.array_equal(sample(model, 2, steps=4, progress=False), sample(smoke_model, 2, steps=4, progress=False))
    with pytest.raises(PretrainedError, match="imported the EMA weights.*ema=True"):
        load_pretrained(run_dir, ema=False)
    weights = run_dir / "train_ldm" / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(PretrainedError, match=re.escape(f"{weights}: content differs")):
        load_pretrained(run_dir)


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------
def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to one grey level on a tiny fraction of pixels (CPU kernels block batches of other sizes
    differently; the sample stage has the same tolerance)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_sample_shape_dtype_and_per_sample_seeds(smoke_model):
    images = sample(smoke_model, 5, seed=3, batch_size=2, progress=False)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, sample(smoke_model, 5, seed=3, batch_size=2, progress=False))
    assert _close(images, sample(smoke_model, 5, seed=3, batch_size=5, progress=False))
    assert _close(images[2:3], sample(smoke_model, 1, seed=5, progress=False))  # sample i has seed `seed + i`
    assert not _close(images[:1], images[1:2])
    assert not _close(images[:1], sample(smoke_model, 1, seed=4, progress=False))


def test_sampler_settings_are_overridden_and_checked(smoke_model):
    few = sample(smoke_model, 2, steps=2, progress=False)
    assert not _close(few, sample(smoke_model, 2, steps=10, progress=False))
    assert not _close(few, sample(smoke_model, 2, steps=2, eta=1.0, progress=False))
    with pytest.raises(ValueError, match="sampler.eta must be in"):
        sample(smoke_model, 1, eta=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        sample(smoke_model, 1, class_labels=0)


def test_class_labels(cin_model):
    default = sample(cin_model, 4, seed=1, progress=False)  # balanced: sample i has class i % 3
    assert np.array_equal(default, sample(cin_model, 4, seed=1, class_labels=[0, 1, 2, 0], progress=False))
    same = sample(cin_model, 4, seed=1, class_labels=2, progress=False)
    assert np.array_equal(same[2], default[2]) and not _close(same[:1], default[:1])
    unguided = sample(cin_model, 4, seed=1, guidance_scale=1.0, progress=False)
    assert not _close(unguided, default)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        sample(cin_model, 2, class_labels=[0, 3])
    with pytest.raises(ValueError, match="one integer or 2 integers"):
        sample(cin_model, 2, class_labels=[0])


# ---------------------------------------------------------------------------------------------------------
# The README's example
# ---------------------------------------------------------------------------------------------------------
def test_readme_api_example_runs(released, tmp_path, monkeypatch):
    """The README's Python API block, unchanged, with the zoo and cache pointed (by their environment variables)
    at a zoo whose `lsun_churches` row serves the tiny smoke model."""
    section = (REPO / "README.md").read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    with http_server(released["root"]) as (url, state):
        zoo = _write_zoo(tmp_path / "zoo.csv", [{"name": "lsun_churches", "url": f"{url}/smoke.zip"}])
        monkeypatch.setenv("REPLICATION_ZOO", str(zoo))
        monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path / "cache"))
        namespace: dict = {}
        exec(compile(blocks[0], "README.md (Python API)", "exec"), namespace)
    assert state["requests"] and (tmp_path / "cache" / "lsun_churches" / CHECKPOINT_FILE).is_file()
    images = namespace["images"]
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
