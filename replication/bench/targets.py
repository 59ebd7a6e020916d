"""The throughput targets at paper shapes and the original networks' FLOP counts, as data, and the verdicts a
measured row gets against them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

# On either card, training must run at least this many times the eager fp32 baseline of the same run.
MIN_TRAIN_SPEEDUP = 4.0
TARGET_CARD = "H200"


@dataclass(frozen=True)
class Target:
    """The target for one row at paper shapes on one H200, next to the original code's speed there."""

    original_img_per_s: float  # CompVis/latent-diffusion on one H200 (shared/ANCHORS.md)
    min_img_per_s: float
    max_mem_gib: Optional[float] = None
    original_mem_gib: Optional[float] = None


TARGETS: dict[tuple[str, str], Target] = {
    ("lsun_churches_ldm8", "train"): Target(original_img_per_s=326.0, min_img_per_s=1300.0),
    ("celebahq_ldm4", "train"): Target(original_img_per_s=136.5, min_img_per_s=400.0, max_mem_gib=40.0,
                                       original_mem_gib=84.7),
    ("lsun_churches_ldm8", "sample"): Target(original_img_per_s=8.6, min_img_per_s=30.0),
    ("celebahq_ldm4", "sample"): Target(original_img_per_s=3.0, min_img_per_s=9.0),
}
# GFLOP per image of the original networks, counted independently (shared/ANCHORS.md); ours must agree.
ORIGINAL_GFLOP: dict[tuple[str, str], float] = {
    ("lsun_churches_ldm8", "unet_forward"): 41.85,
    ("celebahq_ldm4", "unet_forward"): 202.4,
    ("lsun_churches_ldm8", "encode"): 272.7,
    ("lsun_churches_ldm8", "decode"): 622.2,
}


def verdict(experiment: str, row: str, fast: dict[str, Any], speedup: Optional[float], device: str,
            device_type: str = "cuda") -> str:
    """'met' / 'missed' per check: the 4x training ratio on any GPU, the H200 targets on an H200 only.
    The CPU runs tiny shapes to test the benchmark itself; there is no CPU target."""
    checks = []
    if device_type != "cuda":
        return "no target on the CPU"
    if row == "train":
        ok = speedup is not None and speedup >= MIN_TRAIN_SPEEDUP
        checks.append(f">= {MIN_TRAIN_SPEEDUP:g}x eager fp32: {'met' if ok else 'missed'}")
    target = TARGETS.get((experiment, row))
    if target is not None:
        if TARGET_CARD.lower() not in device.lower():
            checks.append(f"{TARGET_CARD} target: not applicable on this device")
        else:
            rate = fast.get("img_per_s") or 0.0
            checks.append(f">= {target.min_img_per_s:g} img/s: {'met' if rate >= target.min_img_per_s else 'missed'}")
            if target.max_mem_gib is not None:
                mem = fast.get("peak_mem_gib")
                ok = mem is not None and mem <= target.max_mem_gib
                checks.append(f"<= {target.max_mem_gib:g} GiB: {'met' if ok else 'missed'}")
    return "; ".join(checks)


def gflop_checks(experiment: str, counted: dict[str, float]) -> dict[str, Any]:
    """Our counted GFLOP/img next to the original networks' count, for the keys of ORIGINAL_GFLOP measured."""
    checks = {}
    for (exp, key), original in ORIGINAL_GFLOP.items():
        if exp == experiment and key in counted:
            checks[key] = {"counted": counted[key], "original_code": original,
                           "rel_diff": abs(counted[key] - original) / original}
    return checks


def target_summary(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The four target rows against the fastest fast path measured for each across `reports` (GPU runs only),
    with the eager fp32 baseline of that same run (speed-ups are never taken across runs). A target row that no
    run measured is listed as not measured."""
    summary = []
    for (experiment, name), target in TARGETS.items():
        best: Optional[tuple[dict[str, Any], dict[str, Any]]] = None
        for rep in reports:
            if rep["experiment"] != experiment or rep["device"].get("type") != "cuda":
                continue
            for row in rep["rows"]:
                rate = row["fast"].get("img_per_s")
                if row["row"] == name and rate and (best is None or rate > best[1]["fast"]["img_per_s"]):
                    best = (rep, row)
        entry: dict[str, Any] = {"experiment": experiment, "row": name, "target": dataclasses.asdict(target),
                                 "measured": best is not None}
        if best is not None:
            rep, row = best
            entry.update(device=rep["device"]["name"], run_created=rep["created"], batch=row["batch"],
                         levers=row["fast"].get("levers"), fast_img_per_s=row["fast"]["img_per_s"],
                         eager_img_per_s=row["baseline"].get("img_per_s"), speedup=row["speedup"],
                         mfu=row["fast"].get("mfu"), peak_mem_gib=row["fast"].get("peak_mem_gib"),
                         verdict=row.get("verdict"), noisy=bool(row.get("noisy")), noise=row.get("noise"))
        summary.append(entry)
    return summary
