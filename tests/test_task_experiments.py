"""The super-resolution (Tab. 5/11) and inpainting (Tab. 6/7) experiments against the paper's tables: each names a
row of reports/paper/results.csv with the value it repeats, samples as that row says, evaluates on the set the
protocol names, and builds models of the sizes the paper states."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from replication.config import validate_config
from replication.report.paper import load_paper_results
from replication.stages.entry import compose

PAPER_DIR = Path(__file__).resolve().parents[1] / "reports" / "paper"
# experiment -> the paper metric its `paper.value` repeats
SUPERRES = {"imagenet_sr_ldm4": "FID_valsplit_ref", "imagenet_sr_ldm4_big": "FID_valsplit_ref",
            "imagenet_sr_ldm4_15ep": "FID_valsplit_ref", "imagenet_sr_ldm4_guided50": "FID_valsplit_ref",
            "imagenet_sr_ldm4_guided100": "FID_valsplit_ref"}
INPAINTING = {"inpainting_ldm4_big_ft": "FID_all", "inpainting_ldm4_big": "FID_all", "inpainting_ldm4_attn": "FID_all",
              "inpainting_ldm4_noattn": "FID_all"}
ABLATION = {name: "FID_2k_val_after_epoch6" for name in ("inpainting_ablation_ldm1", "inpainting_ablation_kl_attn",
                                                         "inpainting_ablation_vq_attn", "inpainting_ablation_vq_noattn")}
ALL = {**SUPERRES, **INPAINTING, **ABLATION}


def _typed(name: str):
    return validate_config(compose([f"experiment={name}"]))


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sizes(typed) -> tuple[int, int]:
    """(U-Net, first stage) parameter counts, built on the meta device."""
    from replication.stages.artifacts import build_first_stage, build_unet

    with torch.device("meta"):
        return _params(build_unet(typed)), _params(build_first_stage(typed))


@pytest.mark.parametrize("name", sorted(ALL))
def test_each_experiment_repeats_its_paper_row(name):
    typed = _typed(name)
    ref = typed.root.paper
    paper = load_paper_results(PAPER_DIR)
    row = paper.row(ref.table, ref.dataset, ref.method, ALL[name])
    assert row.value == pytest.approx(ref.value) and row.table == ref.table
    opening = (Path(__file__).resolve().parents[1] / "experiments" / "experiment" / f"{name}.yaml").read_text()
    opening = opening.split("\ndefaults:")[0]  # the comment before the config
    assert f"Table {ref.table}" in opening and f'row "{ref.method}"' in opening and f"{ref.value:g}" in opening
    if row.sampler_steps is not None:  # Tab. 5/11 state the DDIM steps of each row
        assert typed.sampler.steps == row.sampler_steps and typed.root.paper_protocol.steps == row.sampler_steps


@pytest.mark.parametrize("name", sorted(SUPERRES))
def test_superres_rows_sample_the_filtered_validation_images(name):
    typed = _typed(name)
    assert typed.dataset.family.value == "imagenet_sr" and typed.dataset.fid_reference.value == "val"
    cond = typed.root.conditioning
    assert (cond.kind.value, cond.degradation, cond.sr_factor) == ("lowres", "pil_bicubic", 4)
    assert typed.sampler.kind == "ddim" and typed.sampler.num_samples == typed.metrics.paper_num_samples == 48627
    assert not typed.trainer.use_latent_cache and typed.metrics.isc and not typed.metrics.pr
    guided = "guided" in name
    assert (typed.sampler.image_guidance_scale > 0) == guided
    if guided:
        assert typed.sampler.image_guidance_loss == "lpips"


@pytest.mark.parametrize("name", sorted(INPAINTING) + sorted(ABLATION))
def test_inpainting_rows_evaluate_their_list_at_512(name):
    from replication.models.autoencoder_config import downsampling_factor

    typed = _typed(name)
    places = typed.dataset.places
    assert typed.dataset.family.value == "places" and typed.dataset.resolution == 256  # random 256 training crops
    # the sample stage draws latents of the evaluation crops' size
    assert typed.unet.image_size * downsampling_factor(typed.autoencoder) == places.eval_resolution == 512
    expected = ("test", 30000) if name in INPAINTING else ("ablation", 2000)
    count = expected[1]
    assert (places.eval_list.value, typed.sampler.num_samples, typed.metrics.paper_num_samples) == (*expected, count)
    assert typed.root.conditioning.kind.value == "masked_image" and not typed.trainer.use_latent_cache


def test_model_sizes_are_the_papers():
    M = 1_000_000
    unet, first = _sizes(_typed("imagenet_sr_ldm4"))
    assert round((unet + first) / M) == 169  # Tab. 5: 169M (bsr_sr U-Net + VQ-f4)
    unet, first = _sizes(_typed("imagenet_sr_ldm4_big"))
    assert abs((unet + first) / M - 552) / 552 < 0.01  # Tab. 5: 552M (our U-Net is a guess of that size)
    assert round(_sizes(_typed("inpainting_ldm4_big"))[0] / M) == 387  # Sec. 4.5: the big U-Net, 387M
    small = {name: _sizes(_typed(name))[0] for name in ["inpainting_ldm4_attn", "inpainting_ldm4_noattn", *ABLATION]}
    assert {round(n / M) for n in small.values()} == {215}  # Tab. 15 / Tab. 7: 215M; Tab. 6: the same for all rows
    assert len(set(small.values())) == 1


def test_first_stages_of_the_ablation_rows():
    stages = {name: (_typed(name).autoencoder.name) for name in ABLATION}
    assert stages == {"inpainting_ablation_ldm1": "identity_f1", "inpainting_ablation_kl_attn": "kl_f4",
                      "inpainting_ablation_vq_attn": "vq_f4", "inpainting_ablation_vq_noattn": "vq_f4_noattn"}
    assert _typed("inpainting_ldm4_attn").autoencoder.name == "vq_f4"
    assert _typed("inpainting_ldm4_noattn").autoencoder.name == "vq_f4_noattn"
