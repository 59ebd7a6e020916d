"""Every setting is checked before any work: run names stay plain identifiers (so run folders stay under the runs
root), every float of every config section is finite and in range, the output folders are writable, and the disk
holds the run's estimated needs. Bad input ends `python -m replication.run` with one line and exit status 2."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from replication import preflight
from replication.config import GROUPS, ConfigError, to_container, validate_config
from replication.metrics.reference import ReferenceStats, load_or_compute_reference, stats_nbytes
from replication.stages.entry import compose
from replication.utils.io import ArtifactError
from replication.utils.paths import PathEscapeError, contained, is_plain_name
from replication.utils.schema import check_range, non_finite_floats
from pipeline_helpers import REPO, env, paths_overrides

GROUP_NAMES = GROUPS


@pytest.fixture(scope="module")
def smoke_cfg():
    return compose(["experiment=smoke"])


def _with(cfg, **updates):
    """A copy of `cfg` with dotted keys set (new keys allowed), e.g. _with(cfg, **{"unet.dropout": 1.0})."""
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key, value in updates.items():
        OmegaConf.update(new, key, value, force_add=True)
    return new


# ------------------------------------------------------------------------------------------------------- names

@pytest.mark.parametrize("key", ["name", "reuse_from"])
@pytest.mark.parametrize("value", ["../../somewhere", "/abs/path", "", "a b", "two\nlines", ".hidden", "a/b"])
def test_run_names_must_be_plain_identifiers(smoke_cfg, key, value):
    with pytest.raises(ConfigError) as info:
        validate_config(_with(smoke_cfg, **{key: value}))
    msg = str(info.value)
    assert msg.startswith(f"{key}=") and "plain identifier" in msg and "\n" not in msg.replace(repr(value), "")


def test_plain_names_are_accepted(smoke_cfg):
    typed = validate_config(_with(smoke_cfg, name="churches_eta1", reuse_from="ldm-4.v2"))
    assert (typed.root.name, typed.root.reuse_from) == ("churches_eta1", "ldm-4.v2")
    assert all(is_plain_name(v) for v in ("smoke", "0", "a.b", "A_b-1")) and not is_plain_name(None)


def test_contained_returns_paths_inside_the_root_only(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    assert contained(root, "smoke", "sample") == (root / "smoke" / "sample").resolve()
    for parts in (("..", "elsewhere"), ("/abs/path",), ("",), ("a", "..", "..", "b")):
        with pytest.raises(PathEscapeError, match="not inside"):
            contained(root, *parts, what="run folder")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)  # a symlink out of the root counts as outside
    with pytest.raises(ConfigError, match="run folder"):  # a ConfigError: the command line reports it in one line
        contained(root, "link", "sample", what="run folder")
    assert contained(root) == root.resolve()


# ------------------------------------------------------------------------------------------- finite and in range

def _float_leaves(obj, path=""):
    """Dotted paths (with [i] for list items) of every float in a plain container."""
    if isinstance(obj, float):
        yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _float_leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _float_leaves(v, f"{path}[{i}]")


def _set(container, path, value):
    keys = path.replace("[", ".").replace("]", "").split(".")
    node = container
    for k in keys[:-1]:  # a section the YAML leaves to its schema default is written out
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def test_every_section_refuses_non_finite_floats(smoke_cfg):
    """Whichever validator a section has, a NaN or an infinity in its floats is refused, naming the key: the first
    and the last float of every section that has floats (the smoke metrics section has none; the dataset's are the
    super-resolution crop factors)."""
    typed = validate_config(smoke_cfg)
    base = OmegaConf.to_container(smoke_cfg, resolve=True)
    per_section = {group: [f"{group}.{p}" for p in _float_leaves(to_container(getattr(typed, group)))] for group in GROUP_NAMES}
    per_section["<root>"] = list(_float_leaves(to_container(typed.root)))
    assert {g for g, paths in per_section.items() if paths} == {"dataset", "autoencoder", "unet", "diffusion",
                                                                 "sampler", "trainer", "classifier", "<root>"}
    bad_values = iter([math.nan, math.inf, -math.inf] * 10)
    for paths in per_section.values():
        for path in {paths[0], paths[-1]} if paths else ():
            cfg = json.loads(json.dumps(base))
            _set(cfg, path, next(bad_values))
            with pytest.raises(ConfigError) as info:
                validate_config(OmegaConf.create(cfg))
            key = path.rsplit(".", 1)[-1]
            assert key in str(info.value) and "\n" not in str(info.value), (path, str(info.value))
    cfg = json.loads(json.dumps(base))
    cfg["paper"]["value"] = math.inf  # an optional float of the root section
    with pytest.raises(ConfigError, match=r"^paper.value=inf: config values must be finite"):
        validate_config(OmegaConf.create(cfg))


@pytest.mark.parametrize("key, value, rule", [
    ("trainer.base_lr", 0.0, "> 0"),
    ("trainer.ema_decay", 1.5, "in [0, 1]"),
    ("trainer.weight_decay", -0.01, ">= 0"),
    ("trainer.adam_betas", [0.9, 1.0], "in [0, 1)"),
    ("trainer.grad_clip", 0.0, "> 0"),
    ("autoencoder.train.base_lr", -1e-4, "> 0"),
    ("autoencoder.loss.kl_weight", -1.0, ">= 0"),
    ("autoencoder.loss.perceptual_weight", -0.5, ">= 0"),
    ("autoencoder.ddconfig.dropout", 1.0, "in [0, 1)"),
    ("unet.dropout", 1.0, "in [0, 1)"),
    ("unet.dropout", -0.1, "in [0, 1)"),
    ("cpu_threads", 0, ">= 1"),
    ("sample_shard_size", 0, ">= 1"),
    ("paper_protocol.eta", 2.0, "in [0, 1]"),
])
def test_out_of_range_values_are_refused_naming_key_and_rule(smoke_cfg, key, value, rule):
    with pytest.raises(ConfigError) as info:
        validate_config(_with(smoke_cfg, **{key: value}))
    msg = str(info.value)
    assert key.split(".", 1)[-1] in msg and rule in msg and "\n" not in msg


def test_check_range_and_non_finite_floats_helpers():
    check_range(0.5, "x", low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"x must be in \[0, 1\), got nan"):
        check_range(math.nan, "x", low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match="y must be > 0, got 0"):
        check_range(0, "y", low=0, low_open=True)
    Cfg = namedtuple("Cfg", "a")
    assert non_finite_floats({"a": [1.0, math.inf], "b": {"c": math.nan}, "d": True, "e": "nan"}, "g") == \
        ["g.a[1]=inf", "g.b.c=nan"]
    assert non_finite_floats(Cfg(math.nan), "g") == ["g[0]=nan"]  # a tuple is walked item by item


# ---------------------------------------------------------------------------------------------- writable roots

def test_unwritable_output_roots_are_refused_in_one_line(smoke_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for overrides, key, reason in (({"runs_root": "/proc"}, "runs_root", "not writable"),
                                   ({"reports_dir": str(blocker / "reports")}, "reports_dir", "is a file"),
                                   ({"runs_root": str(tmp_path / "runs"), "metrics.reference_cache_dir": str(blocker)},
                                    "metrics.reference_cache_dir", "is a file")):
        typed = validate_config(_with(smoke_cfg, **{"runs_root": str(tmp_path / "runs"),
                                                    "reports_dir": str(tmp_path / "reports"), **overrides}))
        with pytest.raises(ConfigError) as info:
            preflight.check_output_roots(typed)
        assert str(info.value).startswith(f"{key}=") and reason in str(info.value) and "\n" not in str(info.value)
    good = tmp_path / "new" / "runs"
    preflight.check_writable(good, "runs_root")
    assert good.is_dir() and list(good.iterdir()) == []  # made, and the probe file is gone


# ----------------------------------------------------------------------------------------------------- free space

def _disk_usage_with_free(free: int):
    real = shutil.disk_usage

    def fake(path):
        usage = real(path)
        return usage._replace(free=free)

    return fake


def test_run_refuses_an_impossible_disk_need_before_any_stage(smoke_cfg, tmp_path, monkeypatch, capsys):
    from replication.run import run

    cfg = _with(smoke_cfg, **{"runs_root": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports"),
                              "data_root": str(tmp_path / "data")})
    monkeypatch.setattr(shutil, "disk_usage", _disk_usage_with_free(10 << 20))  # 10 MiB free
    with pytest.raises(ArtifactError) as info:
        run(cfg)
    msg = str(info.value)
    assert "needs about" in msg and "0.010 GiB is free" in msg and "latent cache" in msg and "\n" not in msg
    assert "disk estimate:" in capsys.readouterr().err  # printed before the check
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # only the (empty) output folders were made


def test_reference_statistics_are_not_written_without_room(tmp_path, monkeypatch):
    dim, rows = 16, 10
    stats = ReferenceStats(np.zeros(dim), np.eye(dim), np.zeros((rows, dim), np.float32), "d", "train", "h", "x", rows)
    monkeypatch.setattr(shutil, "disk_usage", _disk_usage_with_free(stats_nbytes(dim, rows) - 1))
    with pytest.raises(ArtifactError, match="not enough free disk space for reference statistics"):
        stats.save(tmp_path / "ref.npz")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    stats.save(tmp_path / "ref.npz")
    assert (tmp_path / "ref.npz").stat().st_size <= stats_nbytes(dim, rows)


def test_reference_statistics_are_not_computed_without_room(tmp_path, monkeypatch):
    from replication.metrics.features import build_extractor

    extractor = build_extractor("standin", allow_standin=True)
    computed = []

    def batches():
        computed.append(True)
        yield np.zeros((2, 3, 32, 32), np.uint8)

    monkeypatch.setattr(shutil, "disk_usage", _disk_usage_with_free(1 << 10))
    with pytest.raises(ArtifactError, match="not enough free disk space for reference statistics"):
        load_or_compute_reference(tmp_path, "d", "train", "h", extractor, batches, pr_count=2)
    assert computed == [] and list(tmp_path.iterdir()) == []


def test_disk_estimate_of_a_paper_run_counts_each_part(tmp_path):
    typed = validate_config(compose(["experiment=lsun_churches_ldm8", f"runs_root={tmp_path / 'runs'}",
                                     "stages=[prepare,encode_latents,sample]", "trainer.pretrained=/w/model.ckpt"]))
    needs = {n.what.split(" (")[0]: n.nbytes for n in preflight.estimate_disk_needs(typed)}
    side = 256
    assert needs["prepared images"] == 126_227 * side * side * 3  # LSUN church_outdoor, train + val
    assert needs["latent cache"] == 126_227 * 2 * 8 * 32 * 32 * 4  # both flips of KL f8 moments (2 x 4 channels)
    assert needs["samples"] == 50_000 * side * side * 3
    assert set(needs) == {"prepared images", "latent cache", "samples"}  # only the selected stages count


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def short_smoke_run(tmp_path_factory):
    """The smoke experiment cut to a few steps and samples, prepare to sample (what the estimate is made of)."""
    work = tmp_path_factory.mktemp("short_smoke")
    overrides = ["experiment=smoke", *paths_overrides(work), "autoencoder.train.steps=4",
                 "autoencoder.train.batch_size=2", "autoencoder.train.log_every=2", "trainer.steps=4",
                 "trainer.ckpt_every=2", "trainer.eval_every=2", "trainer.eval_num_samples=8", "trainer.log_every=2",
                 "sampler.num_samples=32", "curves.ddim_steps=[5]", "curves.num_samples=8", "sampler.steps=5",
                 "stages=[prepare,train_autoencoder,encode_latents,train_ldm,sample]", "cpu_threads=1",
                 "dataset.builtin.num_train=32", "dataset.builtin.num_val=8", "trainer.batch_size=4"]
    proc = subprocess.run([sys.executable, "-m", "replication.run", *overrides], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work, overrides, proc


def test_disk_estimate_is_printed_and_matches_a_real_run(short_smoke_run):
    work, overrides, proc = short_smoke_run
    assert "disk estimate:" in proc.stderr
    fresh = [o for o in overrides if not o.startswith("runs_root=")] + [f"runs_root={work / 'fresh_runs'}"]
    estimate = sum(n.nbytes for n in preflight.estimate_disk_needs(validate_config(compose(fresh))))
    used = _du(work / "runs")
    assert used / 1.5 <= estimate <= used * 1.5, (estimate, used)
    # once the stages are done, a rerun needs nothing new
    assert preflight.estimate_disk_needs(validate_config(compose(overrides))) == []


# --------------------------------------------------------------------------------------- command line, one line

@pytest.mark.parametrize("override, expected", [
    ("name=../escaped", "name='../escaped' is not a plain identifier"),
    ("sampler.guidance_scale=inf", "sampler.guidance_scale=inf: config values must be finite"),
    ("runs_root=/proc", "runs_root='/proc' is not writable"),
])
def test_bad_settings_end_the_run_with_one_line_and_status_2(tmp_path, override, expected):
    overrides = [o for o in paths_overrides(tmp_path) if not (override.startswith("runs_root") and
                                                              o.startswith("runs_root"))]
    proc = subprocess.run([sys.executable, "-m", "replication.run", "experiment=smoke", *overrides, override],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "runs" / "smoke").exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written anywhere under the work folder
