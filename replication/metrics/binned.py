"""Inpainting scores over all images and per masked-area bin (LaMa's evaluation protocol, used by Tab. 6 and 7).

Each image carries the fraction of it the mask covers. FID and LPIPS are reported over all images and over each
bin of masked area; Tab. 7 quotes the "40-50%" bin beside the whole set. A bin's FID compares the inpainted images
of that bin with the originals of the same images, so the two sets always hold the same scenes.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from replication.data.masks import NUM_AREA_BINS, area_bin, bin_label
from replication.metrics.fid import fid_from_features
from replication.metrics.reconstruction import summarize

# a bin with fewer images gets no FID (the covariance of fewer points than two is undefined)
MIN_IMAGES_FOR_FID = 2


def binned_scores(areas: Sequence[float], lpips: Optional[Sequence[float]], fake_features: np.ndarray,
                  real_features: np.ndarray, bins: int = NUM_AREA_BINS,
                  min_images: int = MIN_IMAGES_FOR_FID) -> dict[str, Any]:
    """{"all": {...}, "bins": {"40-50%": {...}, ...}}: per set the image count, FID (None with a reason when the set
    is too small) and LPIPS mean and std over images (when given). Row i of every input belongs to image i."""
    areas = np.asarray(areas, dtype=np.float64)
    fake, real = np.asarray(fake_features), np.asarray(real_features)
    n = len(areas)
    if fake.shape[0] != n or real.shape[0] != n:
        raise ValueError(f"{n} mask areas but {fake.shape[0]} inpainted and {real.shape[0]} original feature rows")
    lp = None if lpips is None else np.asarray(lpips, dtype=np.float64)
    if lp is not None and lp.shape != (n,):
        raise ValueError(f"{n} mask areas but {lp.shape} LPIPS values")
    index = np.array([area_bin(float(a), bins) for a in areas], dtype=np.int64)

    def scores(rows: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"count": int(rows.size)}
        if rows.size >= min_images:
            out["FID"] = fid_from_features(fake[rows], real[rows])
        else:
            out["FID"], out["FID_note"] = None, f"{rows.size} image(s): FID needs at least {min_images}"
        if lp is not None and rows.size:
            out["LPIPS"] = summarize(lp[rows])
        return out

    return {"all": scores(np.arange(n)),
            "bins": {bin_label(b, bins): scores(np.flatnonzero(index == b)) for b in range(bins)}}
