"""The project's FID/IS/KID equal a direct torch-fidelity 0.4 call on the same images with the same extractor.

The Inception weights are a randomly initialised torch-fidelity FeatureExtractorInceptionV3 saved to a file and
loaded through the project's weights-path code (the real file cannot be downloaded here). The streamed
features go through the PNG export, and torch-fidelity reads those PNGs, so this also checks that streaming
equals writing PNGs and reading them back, and (batches of 2 and 1 vs torch-fidelity's 3) batch-size independence.
"""
from __future__ import annotations


import pytest
import torch
from PIL import Image

from replication.metrics.features import LOGITS_UNBIASED, POOL, build_extractor
from replication.metrics.fid import fid_features_to_stats
from replication.metrics.inception_score import inception_score
from replication.metrics.kid import kernel_inception_distance
from replication.metrics.reference import compute_reference_stats
from replication.metrics.streaming import FeatureAccumulator

# Relative tolerance of the FID comparison: both sides use the same float32 features; they differ only in
# float64 statistics code and in how Tr((S1 S2)^1/2) is computed (our exact low-rank form for N < 2048 vs
# torch-fidelity's eigvals of the 2048 x 2048 product).
FID_RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py

@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    with pytest.MonkeyPatch.context() as mp:
        # Build the network without its weight loading (which would download), keeping the random init.
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(cls, "load_state_dict", lambda self, *a, **k: None)
        net = cls("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # He-normal, so activations keep their scale through the ~40 layers
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
    path = tmp_path_factory.mktemp("weights") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def _write_pngs(images: torch.Tensor, folder):
    folder.mkdir()
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:06d}.png")


def test_fid_is_kid_equal_direct_torch_fidelity_call(tmp_path, random_inception_weights):
    import torch_fidelity

    g = torch.Generator().manual_seed(1)
    samples = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    reference_images = (torch.rand((3, 3, 32, 32), generator=g) ** 2 * 255).to(torch.uint8)

    extractor = build_extractor("inception-v3-compat", random_inception_weights)
    assert extractor.weights.official is False  # a random file is recognised as not the published one
    acc = FeatureAccumulator(extractor, png_dir=tmp_path / "samples")
    acc.add(samples[:2])
    acc.add(samples[2:])
    feats = acc.result()
    reference = compute_reference_stats(reference_images.split(2), extractor, "test", "train", "h", pr_count=3)
    _write_pngs(reference_images, tmp_path / "reference")

    ours_fid = fid_features_to_stats(feats[POOL], reference.mu, reference.sigma)  # the evaluate stage's route
    ours_is = inception_score(feats[LOGITS_UNBIASED], splits=1, seed=2020)
    ours_kid = kernel_inception_distance(feats[POOL], reference.pr_features, subsets=2, subset_size=3, seed=2020)

    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "samples"), input2=str(tmp_path / "reference"),
        fid=True, isc=True, kid=True, isc_splits=1, kid_subsets=2, kid_subset_size=3, rng_seed=2020,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(random_inception_weights),
        batch_size=3, cuda=False, cache=False, save_cpu_ram=True, verbose=False,
    )
    assert ours_fid > 0
    assert ours_fid == pytest.approx(theirs["frechet_inception_distance"], rel=FID_RTOL)
    assert ours_is.value == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    # KID: same rows chosen (same seeded draws); reference rows in our npz are the 3 images in another order,
    # which changes nothing for a subset of all 3.
    assert ours_kid.value == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3, abs=1e-9)
