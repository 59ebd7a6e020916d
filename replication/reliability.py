"""Kill-and-resume check: train an experiment's LDM uninterrupted, then again while killing the process at
random points (SIGKILL, or SIGTERM as a cluster sends before preemption), resume, and compare step for step.

    python -m replication.reliability experiment=smoke --kills 3 --signal KILL --out reports/reliability

It writes `<out>/kill_resume.json`, `<out>/kill_resume.md` and `<out>/kill_resume.png` (both loss curves with
the kill points). The reliability tests call the same functions. Each phase logs what it does, and while a child
process runs, a line at a steady interval (stages done or training step, rate, ETA; utils/progress.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from replication.utils.progress import ProgressLog

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("replication.reliability")
INPUT_STAGES = ("prepare", "train_autoencoder", "encode_latents")
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


def run_watched(cmd: list[str], what: str, count: Any, total: Optional[int], unit: str,
                interval_s: Optional[float] = None, poll_s: float = 0.2) -> None:
    """Run `cmd` to the end, logging its progress meanwhile: `count()` (e.g. the training step read from the child's
    stats) as a ProgressLog line every `interval_s` seconds. A failure raises CalledProcessError with the child's
    output, as subprocess.run(check=True, capture_output=True) does."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=out, stderr=err, text=True)
        seen = 0
        progress = ProgressLog(what, total=total, unit=unit, interval_s=interval_s, logger=log)
        try:
            while proc.poll() is None:
                now = count()
                progress.update(max(now - seen, 0))
                seen = max(seen, now)
                time.sleep(poll_s)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        now = count()
        progress.update(max(now - seen, 0))
        progress.close(done=proc.returncode == 0)
        if proc.returncode != 0:
            out.seek(0)
            err.seek(0)
            raise subprocess.CalledProcessError(proc.returncode, cmd, out.read(), err.read())


def stages_done(work: Path, experiment: str, stages: tuple[str, ...] = INPUT_STAGES) -> int:
    return sum((work / "runs" / experiment / s / "done.json").exists() for s in stages)


def last_step(work: Path, experiment: str) -> int:
    try:
        return max(losses(work, experiment), default=0) if stats_path(work, experiment).exists() else 0
    except (ValueError, OSError):  # a line being written: read again at the next poll
        return 0


def train_steps() -> Optional[int]:
    steps = [o.split("=", 1)[1] for o in TRAIN_OVERRIDES if o.startswith("trainer.steps=")]
    return int(steps[-1]) if steps else None


def prepare_inputs(work: Path, experiment: str) -> None:
    """Run the stages before train_ldm once (data, autoencoder, latent cache)."""
    log.info("%s: preparing the inputs of training once (%s) in %s", experiment, ", ".join(INPUT_STAGES), work)
    run_watched([sys.executable, "-m", "replication.run", f"experiment={experiment}", *paths_overrides(work),
                 "stages=[prepare,train_autoencoder,encode_latents]"], f"{experiment} inputs",
                lambda: stages_done(work, experiment), len(INPUT_STAGES), "stage")


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
    log.info("%s: training uninterrupted (the reference run)", experiment)
    run_watched(train_cmd(work, experiment), f"{experiment} uninterrupted training",
                lambda: last_step(work, experiment), train_steps(), "step")


def train_with_kills(work: Path, experiment: str, kills: int, sig: int, seed: int) -> list[int]:
    """Start training, kill it `kills` times at random steps, then let it finish. Returns the kill steps."""
    rng = random.Random(seed)
    kill_steps = []
    name = signal.Signals(sig).name
    for k in range(kills):
        start = max(losses(work, experiment), default=0) if stats_path(work, experiment).exists() else 0
        target = start + rng.randint(3, 12)
        log.info("%s: kill %d/%d: training from step %d, %s at step %d or later", experiment, k + 1, kills, start,
                 name, target)
        proc = subprocess.Popen(train_cmd(work, experiment), env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for_step(work, experiment, target, proc)
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=120)
            kill_steps.append(max(losses(work, experiment)))
            log.info("%s: kill %d/%d: %s sent, the last step logged was %d", experiment, k + 1, kills, name,
                     kill_steps[-1])
        else:
            log.info("%s: kill %d/%d: training ended before step %d; no kill", experiment, k + 1, kills, target)
    log.info("%s: resuming to the end after %d kill(s)", experiment, len(kill_steps))
    run_watched(train_cmd(work, experiment), f"{experiment} resumed training", lambda: last_step(work, experiment),
                train_steps(), "step")
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
        log.info("%s: comparing the killed-and-resumed run with the uninterrupted one", experiment)
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
    logging.basicConfig(level=logging.INFO, format="[reliability] %(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    experiment = args.experiment.split("=", 1)[-1]
    result = run_check(experiment, args.kills, getattr(signal, f"SIG{args.signal}"), args.out, args.seed)
    print(json.dumps(result, indent=2))
    return 0 if result["losses_identical"] and result["weights_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
