"""Kill-and-resume check: train an experiment's LDM uninterrupted, then again while killing the process at
random points (SIGKILL, or SIGTERM as a cluster sends before preemption), resume, and compare step for step.

    python -m replication.reliability experiment=smoke --kills 3 --signal KILL --out reports/reliability

It writes `<out>/kill_resume.json`, `<out>/kill_resume.md` and `<out>/kill_resume.png` (both loss curves with
the kill points). The reliability tests call the same functions.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN_OVERRIDES = ["trainer.steps=60", "trainer.ckpt_every=5", "trainer.log_every=1", "trainer.eval_every=0",
                   "trainer.keep_last_ckpts=3"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg",
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"})
    return env


def paths_overrides(work: Path) -> list[str]:
    return [f"runs_root={work / 'runs'}", f"reports_dir={work / 'reports'}", f"data_root={work / 'data'}",
            "progress=false"]


def train_cmd(work: Path, experiment: str, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "replication.stages.train_ldm", f"experiment={experiment}", *paths_overrides(work),
            *TRAIN_OVERRIDES, *(extra or [])]


def prepare_inputs(work: Path, experiment: str) -> None:
    """Run the stages before train_ldm once (data, autoencoder, latent cache)."""
    subprocess.run([sys.executable, "-m", "replication.run", f"experiment={experiment}", *paths_overrides(work),
                    "stages=[prepare,train_autoencoder,encode_latents]"], env=child_env(), cwd=REPO, check=True,
                   capture_output=True)


def clone_inputs(src: Path, dst: Path, experiment: str) -> None:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "runs" / experiment / "train_ldm", ignore_errors=True)


def stats_path(work: Path, experiment: str) -> Path:
    return work / "runs" / experiment / "train_ldm" / "stats.jsonl"


def losses(work: Path, experiment: str) -> dict[int, float]:
    """step -> loss; a step replayed after a kill must give the same loss as its first attempt."""
    from replication.utils.io import read_jsonl

    by_step: dict[int, float] = {}
    for r in read_jsonl(stats_path(work, experiment)):
        if r.get("event") != "train":
            continue
        if r["step"] in by_step and by_step[r["step"]] != r["loss"]:
            raise AssertionError(f"step {r['step']} replayed with a different loss: {by_step[r['step']]} vs {r['loss']}")
        by_step[r["step"]] = r["loss"]
    return by_step


def final_weights(work: Path, experiment: str) -> dict[str, torch.Tensor]:
    from replication.utils.io import load_tensors

    d = work / "runs" / experiment / "train_ldm"
    return {**{f"ema.{k}": v for k, v in load_tensors(d / "ema.safetensors").items()},
            **{f"raw.{k}": v for k, v in load_tensors(d / "model.safetensors").items()}}


def wait_for_step(work: Path, experiment: str, min_step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    path = stats_path(work, experiment)
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            done = losses(work, experiment)
            if done and max(done) >= min_step:
                return
        time.sleep(0.05)


def train_uninterrupted(work: Path, experiment: str) -> None:
    subprocess.run(train_cmd(work, experiment), env=child_env(), cwd=REPO, check=True, capture_output=True)


def train_with_kills(work: Path, experiment: str, kills: int, sig: int, seed: int) -> list[int]:
    """Start training, kill it `kills` times at random steps, then let it finish. Returns the kill steps."""
    rng = random.Random(seed)
    kill_steps = []
    for _ in range(kills):
        start = max(losses(work, experiment), default=0) if stats_path(work, experiment).exists() else 0
        proc = subprocess.Popen(train_cmd(work, experiment), env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for_step(work, experiment, start + rng.randint(3, 12), proc)
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=120)
            kill_steps.append(max(losses(work, experiment)))
    subprocess.run(train_cmd(work, experiment), env=child_env(), cwd=REPO, check=True, capture_output=True)
    return kill_steps


def compare(resumed: Path, reference: Path, experiment: str) -> dict[str, Any]:
    a, b = losses(resumed, experiment), losses(reference, experiment)
    wa, wb = final_weights(resumed, experiment), final_weights(reference, experiment)
    return {"steps": len(b), "same_steps": sorted(a) == sorted(b),
            "losses_identical": a == b, "max_abs_loss_diff": max((abs(a[s] - b[s]) for s in b if s in a), default=None),
            "weights_identical": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)}


def figure(resumed: dict[int, float], reference: dict[int, float], kill_steps: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = sorted(reference)
    ax.plot(steps, [reference[s] for s in steps], lw=3, alpha=0.4, label="uninterrupted")
    ax.plot(sorted(resumed), [resumed[s] for s in sorted(resumed)], "k.", ms=3, label="killed and resumed")
    for i, k in enumerate(kill_steps):
        ax.axvline(k, color="red", ls="--", lw=1, label="kill" if i == 0 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_check(experiment: str, kills: int, sig: int, out: Path, seed: int = 1234) -> dict[str, Any]:
    from replication.utils.io import atomic_write_json, atomic_write_text

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, ref, killed = tmp / "base", tmp / "reference", tmp / "killed"
        prepare_inputs(base, experiment)
        clone_inputs(base, ref, experiment)
        clone_inputs(base, killed, experiment)
        train_uninterrupted(ref, experiment)
        kill_steps = train_with_kills(killed, experiment, kills, sig, seed)
        result = {"experiment": experiment, "signal": signal.Signals(sig).name, "kill_steps": kill_steps,
                  "device": "cpu", **compare(killed, ref, experiment)}
        figure(losses(killed, experiment), losses(ref, experiment), kill_steps, out / "kill_resume.png",
               f"{experiment}: {len(kill_steps)} x SIG{result['signal'][3:]} then resume vs uninterrupted")
    atomic_write_json(out / "kill_resume.json", result)
    atomic_write_text(out / "kill_resume.md", "\n".join([
        f"# Kill-and-resume check ({experiment})", "",
        f"Training killed with {result['signal']} at steps {kill_steps}, resumed each time, compared with an "
        f"uninterrupted run of {result['steps']} steps on the CPU.", "",
        "| check | result |", "|---|---|",
        f"| same steps logged | {result['same_steps']} |",
        f"| loss sequence bit-identical | {result['losses_identical']} |",
        f"| final weights (EMA and raw) bit-identical | {result['weights_identical']} |", "",
        "![kill and resume](kill_resume.png)", ""]))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", nargs="?", default="experiment=smoke")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--signal", choices=["KILL", "TERM", "INT"], default="KILL")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "reliability")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    experiment = args.experiment.split("=", 1)[-1]
    result = run_check(experiment, args.kills, getattr(signal, f"SIG{args.signal}"), args.out, args.seed)
    print(json.dumps(result, indent=2))
    return 0 if result["losses_identical"] and result["weights_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
