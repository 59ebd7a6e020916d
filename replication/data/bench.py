"""Reader throughput: prepared images per second (batches of 64, with and without flips) and cached latents
per second, on a fixed number of CPU cores (the issue's target: >= 3,000 img/s at 256x256 on 2 cores).

    python -m replication.data.bench [--prepared DIR] [--latents FILE] [--cores 2] [--out results.json]

Without --prepared/--latents it builds a temporary set of builtin images (256x256) and random moments."""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from replication.data.builtin import make_builtin_images
from replication.data.latents import LatentDataset, encode_to_cache
from replication.data.prepared import PreparedImages, to_model_input, write_prepared
from replication.utils.io import atomic_write_json

BATCH = 64


def _limit_cores(cores: int) -> list[int]:
    torch.set_num_threads(cores)
    if hasattr(os, "sched_setaffinity"):
        avail = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, avail[:cores])
        return avail[:cores]
    return []


def _time_images(ds: PreparedImages, flip: bool, seconds: float, model_input: bool) -> dict:
    n_img, t0, epoch = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for batch in ds.iter_batches(BATCH, flip=flip, shuffle=True, seed=0, epoch=epoch):
            x = to_model_input(batch["images"]) if model_input else batch["images"]
            n_img += x.shape[0]
            if time.perf_counter() - t0 >= seconds:
                break
        epoch += 1
    dt = time.perf_counter() - t0
    return {"images": n_img, "seconds": dt, "images_per_s": n_img / dt}


def _time_latents(ds: LatentDataset, seconds: float) -> dict:
    n, t0, epoch = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for batch in ds.iter_batches(BATCH, shuffle=True, seed=0, epoch=epoch):
            n += batch["moments"].shape[0]
            if time.perf_counter() - t0 >= seconds:
                break
        epoch += 1
    dt = time.perf_counter() - t0
    return {"latents": n, "seconds": dt, "latents_per_s": n / dt}


def run(prepared: Optional[str], latents: Optional[str], cores: int, seconds: float, num_images: int,
        latent_shape: tuple[int, int, int], out: Optional[str]) -> dict:
    used = _limit_cores(cores)
    with tempfile.TemporaryDirectory() as tmp:
        if prepared is None:
            prepared = str(Path(tmp) / "prepared")
            imgs = make_builtin_images(num_images, 256, seed=0)
            write_prepared(((f"{i}", imgs[i], None) for i in range(num_images)), prepared,
                           {"spec_hash": "bench"}, progress=False)
        ds = PreparedImages(prepared)
        if latents is None:  # a cache of random moments in the real on-disk format
            latents = str(Path(tmp) / "bench.latents")
            g = torch.Generator().manual_seed(0)
            encode_to_cache(lambda x: torch.randn((x.shape[0], *latent_shape), generator=g), ds, latents,
                            batch_size=64, flips=True, progress=False)
        ds.get_batch(np.arange(len(ds)))  # warm the page cache: the number is the reader's, not the disk's
        lat = LatentDataset(latents)
        result = {
            "cores": cores,
            "cpus_used": used,
            "platform": platform.platform(),
            "prepared": {"dir": prepared, "count": len(ds), "resolution": ds.resolution, "batch": BATCH},
            "uint8_no_flip": _time_images(ds, False, seconds, model_input=False),
            "uint8_flip": _time_images(ds, True, seconds, model_input=False),
            "model_input_flip": _time_images(ds, True, seconds, model_input=True),
            "latents": {"file": latents, "count": len(lat), "shape": list(lat.moments.shape[1:]), **_time_latents(lat, seconds)},
        }
    if out:
        atomic_write_json(out, result)
    return result


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepared", default=None, help="prepared folder (default: temporary builtin images)")
    p.add_argument("--latents", default=None, help="latent cache folder (.latents) (default: temporary random moments)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    p.add_argument("--num-images", type=int, default=1024, help="size of the temporary sets")
    p.add_argument("--latent-shape", type=int, nargs=3, default=[6, 64, 64], help="C H W of temporary moments "
                   "(6x64x64: KL f=4 with 3 latent channels, mean and log-variance)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    res = run(a.prepared, a.latents, a.cores, a.seconds, a.num_images, tuple(a.latent_shape), a.out)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
