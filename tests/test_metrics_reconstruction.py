"""PSNR, SSIM and LPIPS against independent computations; LPIPS from a local VGG16 file, offline."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from replication.metrics.config import validate_metrics_cfg
from replication.metrics.evaluate import evaluate_reconstructions
from replication.metrics.features import LOGITS_UNBIASED, POOL, WeightsNotFoundError
from replication.metrics.fid import feature_statistics, frechet_distance
from replication.metrics.reconstruction import ReconstructionAccumulator, build_lpips, psnr, ssim, summarize


pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py

def _pair(n=3, size=24, seed=0, noise=20):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g)
    y = (x + torch.randint(-noise, noise + 1, x.shape, generator=g)).clamp(0, 255)
    return x.to(torch.uint8), y.to(torch.uint8)


def test_psnr_hand_computation():
    x = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    y = x.clone()
    y[0] += 5  # mse 25
    y[1, :, :4] += 10  # half the pixels off by 10: mse 50
    expected = [10 * np.log10(255**2 / 25), 10 * np.log10(255**2 / 50)]
    np.testing.assert_allclose(psnr(x, y).numpy(), expected, rtol=1e-12)
    assert torch.isinf(psnr(x, x)).all()


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 as skimage computes it (gaussian_weights=True, sigma 1.5, truncate 3.5, reflect
    filtering, borders of (11-1)/2 cropped), written with scipy.ndimage, one channel at a time."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(a.shape[0]):
        x, y = a[ch].astype(np.float64), b[ch].astype(np.float64)
        f = lambda z: gaussian_filter(z, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
        ux, uy = f(x), f(y)
        vx, vy, vxy = f(x * x) - ux * ux, f(y * y) - uy * uy, f(x * y) - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())
    return float(np.mean(values))


def test_ssim_matches_skimage_formula():
    x, y = _pair(n=3, size=23, seed=1)
    ours = ssim(x, y).numpy()
    expected = [_ssim_reference(x[i].numpy(), y[i].numpy()) for i in range(3)]
    np.testing.assert_allclose(ours, expected, rtol=1e-10)
    assert 0.0 < ours.min() < 1.0
    np.testing.assert_allclose(ssim(x, x).numpy(), 1.0, rtol=1e-12)


def test_ssim_rejects_small_or_mismatched_images():
    with pytest.raises(ValueError, match="11x11"):
        ssim(*_pair(size=8))
    x, y = _pair()
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(x, y[:, :, :20])


@pytest.fixture(scope="module")
def vgg_features_file(tmp_path_factory):
    """A randomly initialised torchvision VGG16 `features.*` state dict, saved like the real file."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    path = tmp_path_factory.mktemp("weights") / "vgg16-random.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path, features


def test_lpips_from_local_vgg_file_runs_offline(vgg_features_file):
    path, features = vgg_features_file
    metric = build_lpips(path)
    assert not metric.is_standin and metric.weights.official is False
    # The trunk holds the file's weights.
    trunk = metric.model.net.state_dict()
    torch.testing.assert_close(trunk["slice1.0.weight"], features[0].weight)
    torch.testing.assert_close(trunk["slice5.28.weight"], features[28].weight)
    x, y = _pair(n=2, size=32, seed=2)
    d = metric(x, y)
    assert d.shape == (2,) and (d > 0).all()
    np.testing.assert_allclose(metric(x, x).numpy(), 0.0, atol=1e-6)
    # Same result as calling lpips directly on [-1, 1] inputs with the same network.
    direct = metric.model(x.float() / 127.5 - 1, y.float() / 127.5 - 1).flatten()
    torch.testing.assert_close(d.float(), direct)


def test_lpips_missing_weights_and_standin(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="metrics.lpips_vgg_weights"):
        build_lpips(None)
    with pytest.raises(WeightsNotFoundError, match="vgg16-397923af.pth"):
        build_lpips(tmp_path / "absent.pth", allow_standin=True)
    standin = build_lpips(None, allow_standin=True)
    assert standin.is_standin and "STAND-IN" in standin.name


def test_accumulator_and_evaluate_reconstructions(vgg_features_file):
    x, y = _pair(n=4, size=32, seed=3)
    acc = ReconstructionAccumulator(build_lpips(vgg_features_file[0]))
    acc.add(x[:2], y[:2])
    acc.add(x[2:], y[2:])
    per_image = acc.per_image()
    np.testing.assert_allclose(per_image["PSNR"], psnr(x, y).numpy())
    assert per_image["LPIPS"].shape == (4,)
    assert summarize([1.0, 3.0]) == {"value": 2.0, "std": 1.0}

    class Extractor:
        name, is_standin, weights = "inception-v3-compat", False, None

    g = torch.Generator().manual_seed(4)
    orig = {POOL: torch.randn(30, 6, generator=g)}
    rec = {POOL: orig[POOL] + 0.1 * torch.randn(30, 6, generator=g), LOGITS_UNBIASED: torch.randn(30, 5, generator=g)}
    cfg = validate_metrics_cfg({"isc_splits": 3})
    out = evaluate_reconstructions(orig, rec, per_image, cfg, Extractor())
    m = out["metrics"]
    mu_o, s_o = feature_statistics(orig[POOL])
    mu_r, s_r = feature_statistics(rec[POOL])
    assert m["rFID"]["value"] == pytest.approx(frechet_distance(mu_r, s_r, mu_o, s_o))
    assert set(m) == {"rFID", "rIS", "PSNR", "SSIM", "LPIPS"}
    assert m["PSNR"]["value"] == pytest.approx(per_image["PSNR"].mean())
    assert m["SSIM"]["std"] == pytest.approx(per_image["SSIM"].std())
    assert out["n_images"] == 30 and out["not_comparable_reasons"] == []
