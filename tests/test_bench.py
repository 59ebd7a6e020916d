"""The throughput benchmark: it runs end to end on the smoke experiment on the CPU and writes complete results, its
derived numbers follow from its measured ones, and its FLOP counts agree with hand counts and with the original
networks' independently measured counts (shared/ANCHORS.md)."""
from __future__ import annotations

import json
import math

import pytest

from conftest import slow_without_native_bf16  # the bf16 fast path runs for real here
import torch
import torch.nn.functional as F
from torch import nn

from replication.bench.cli import main, parse_args, settings_from_args
from replication.bench.measurement import (OTHER_CATEGORY, MeasurementError, PeakMemory, count_flops,
                                           matmul_peak_tflops, measure, profile_breakdown, profile_category, time_fn)
from replication.bench.merge import merge_reports
from replication.bench.networks import build_unet, compose_typed, first_stage_flops, unet_flops
from replication.bench.rendering import fmt, render_markdown, row_line
from replication.bench.rows import make_row
from replication.bench.runner import run_bench
from replication.bench.settings import NOISE_THRESHOLD, ROWS, SAMPLE_QUOTE_STEPS, BenchError
from replication.bench.targets import MIN_TRAIN_SPEEDUP, ORIGINAL_GFLOP, TARGETS, target_summary, verdict
from replication.perf import FastPath, PerfError

# every lever but compile, which takes ~45 s on this CPU (see the slow test in tests/test_numerics.py)
FAST = "bf16,channels_last,fused_adam"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["experiment=smoke", "--device", "cpu", "--batch", "4", "--sample-batch", "4", "--steps", "1",
                   "--warmup", "1", "--sample-steps", "2", "--fast", FAST, "--out", str(out), "--tag", "smoke",
                   "--quiet"])
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    return out


@slow_without_native_bf16
def test_smoke_bench_writes_every_field(smoke_run):
    report = json.loads((smoke_run / "smoke.json").read_text())
    assert report["experiment"] == "smoke" and report["device"]["type"] == "cpu" and report["complete"] is True
    assert report["baseline"] == "eager fp32" and report["fast_path"] == "bf16+channels_last+fused_adam"
    peak = report["peak_bf16_tflops"]
    assert peak > 0 and report["peak_fp32_tflops"] > 0
    assert [row["row"] for row in report["rows"]] == list(ROWS)
    for row in report["rows"]:
        assert row["gflop_per_img"] > 0
        for mode in ("baseline", "fast"):
            m = row[mode]
            assert m["error"] is None
            for key in ("img_per_s", "tflops", "mfu", "peak_mem_gib", "seconds_per_iter"):
                assert math.isfinite(m[key]) and m[key] > 0, (row["row"], mode, key)
            # derived numbers follow from the measured ones
            assert m["tflops"] == pytest.approx(row["gflop_per_img"] * m["img_per_s"] / 1e3, rel=1e-9)
            assert m["mfu"] == pytest.approx(m["tflops"] / peak, rel=1e-9)
        assert row["baseline"]["levers"] == ["eager fp32"]
        assert row["speedup"] == pytest.approx(row["fast"]["img_per_s"] / row["baseline"]["img_per_s"], rel=1e-9)
        # each path timed 3 times: the median rate, the range of the repeats, and the noisy flag they give
        for mode in ("baseline", "fast"):
            m = row[mode]
            rates = m["img_per_s_repeats"]
            assert m["repeats"] == len(rates) == 3
            assert (m["img_per_s_min"], m["img_per_s_max"]) == (min(rates), max(rates))
            assert m["img_per_s_min"] <= m["img_per_s"] <= m["img_per_s_max"]
            assert m["spread"] == pytest.approx((max(rates) - min(rates)) / m["img_per_s"], rel=1e-9)
            assert m["noisy"] == (m["spread"] > NOISE_THRESHOLD)
        low, high = row["speedup_range"]
        assert low <= row["speedup"] <= high
        assert row["noisy"] == (row["baseline"]["noisy"] or row["fast"]["noisy"]) == (row["noise"] is not None)
        assert row["verdict"] == "no target on the CPU"
        assert row["fast_vs_baseline_rel_err"] is not None and math.isfinite(row["fast_vs_baseline_rel_err"])
    by_name = {row["row"]: row for row in report["rows"]}
    train = by_name["train"]
    assert train["fast"]["levers"] == ["bf16", "channels_last", "fused_adam"]
    assert train["baseline"]["img_per_s"] == pytest.approx(4 / train["baseline"]["seconds_per_iter"], rel=1e-9)
    # sampling: one timed call runs `steps_run` DDIM steps on 4 samples; img/s is quoted at 200 steps
    sample = by_name["sample"]
    assert sample["steps_run"] == 2 and sample["baseline"]["steps_quoted"] == SAMPLE_QUOTE_STEPS
    per_step = sample["baseline"]["seconds_per_iter"] / 2
    assert sample["baseline"]["img_per_s"] == pytest.approx(4 / (per_step * SAMPLE_QUOTE_STEPS), rel=1e-9)
    assert sample["gflop_per_img"] == pytest.approx(report["counted_gflop"]["unet_forward"] * SAMPLE_QUOTE_STEPS)
    assert "fused_adam" not in sample["fast"]["levers"]  # no optimizer in sampling
    assert by_name["features"]["fast"]["levers"] == ["channels_last"]  # FID features stay fp32
    assert by_name["features"]["fast_vs_baseline_rel_err"] < 1e-5
    # a training step is forward + backward: 3 forwards' worth of FLOP, less the first conv's unneeded input grad
    ratio = report["counted_gflop"]["train"] / report["counted_gflop"]["unet_forward"]
    assert 2.5 < ratio <= 3.0


@slow_without_native_bf16
def test_smoke_bench_markdown_table(smoke_run):
    text = (smoke_run / "smoke.md").read_text()
    assert "| row | what | batch | GFLOP/img | eager fp32 img/s | fast img/s | speed-up | fast levers |" in text
    for name in ROWS:
        assert f"| {name} |" in text
    assert "bf16 matmul peak measured" in text and "MFU" in text


@slow_without_native_bf16
def test_merge_writes_one_table_for_several_runs(smoke_run, tmp_path):
    first = json.loads((smoke_run / "smoke.json").read_text())
    second = dict(first, experiment="smoke_copy")
    (tmp_path / "b.json").write_text(json.dumps(second))
    merged = merge_reports([smoke_run / "smoke.json", tmp_path / "b.json"], tmp_path, tag="both")
    data = json.loads((tmp_path / "both.json").read_text())
    assert [r["experiment"] for r in data["reports"]] == ["smoke", "smoke_copy"]
    text = (tmp_path / "both.md").read_text()
    assert "## smoke on" in text and "## smoke_copy on" in text and merged["markdown"] == text
    with pytest.raises(BenchError, match="missing.json"):
        merge_reports([tmp_path / "missing.json"], tmp_path)


def _as_gpu_report(report: dict, experiment: str, created: str, rates: dict) -> dict:
    """A copy of a measured CPU report relabelled as an H200 run of `experiment`, its rows' fast rates replaced
    by `rates` (row -> img/s; rows not named are dropped): input for the cross-run target summary."""
    rep = json.loads(json.dumps(report))
    rep.update(experiment=experiment, created=created, device=dict(rep["device"], type="cuda", name="NVIDIA H200"))
    rows = []
    for row in rep["rows"]:
        if row["row"] in rates:
            row["fast"]["img_per_s"] = rates[row["row"]]
            row["speedup"] = rates[row["row"]] / row["baseline"]["img_per_s"]
            row["verdict"] = verdict(experiment, row["row"], row["fast"], row["speedup"], "NVIDIA H200")
            rows.append(row)
    rep["rows"] = rows
    return rep


@slow_without_native_bf16
def test_target_summary_takes_the_fastest_run_per_target_row_and_merges_merged_files(smoke_run, tmp_path):
    cpu = json.loads((smoke_run / "smoke.json").read_text())
    slow = _as_gpu_report(cpu, "lsun_churches_ldm8", "run-a", {"train": 900.0, "sample": 20.0})
    fast = _as_gpu_report(cpu, "lsun_churches_ldm8", "run-b", {"train": 1400.0})
    celeba = _as_gpu_report(cpu, "celebahq_ldm4", "run-c", {"train": 450.0})
    for name, rep in (("a", slow), ("b", fast), ("c", celeba)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rep))
    merge_reports([tmp_path / "a.json", tmp_path / "b.json"], tmp_path, tag="ab")
    # a merged file merges again: its reports are taken one by one
    merged = merge_reports([tmp_path / "ab.json", tmp_path / "c.json"], tmp_path, tag="all")
    assert [r["created"] for r in merged["reports"]] == ["run-a", "run-b", "run-c"]
    by_key = {(e["experiment"], e["row"]): e for e in merged["targets"]}
    assert set(by_key) == set(TARGETS)
    churches_train = by_key[("lsun_churches_ldm8", "train")]
    assert churches_train["fast_img_per_s"] == 1400.0 and churches_train["run_created"] == "run-b"
    assert ">= 1300 img/s: met" in churches_train["verdict"]
    assert by_key[("lsun_churches_ldm8", "sample")]["run_created"] == "run-a"
    assert ">= 30 img/s: missed" in by_key[("lsun_churches_ldm8", "sample")]["verdict"]
    assert by_key[("celebahq_ldm4", "sample")]["measured"] is False
    text = (tmp_path / "all.md").read_text()
    assert "## Targets (one" in text and "not measured" in text and "| 1,400.0 |" in text
    # CPU runs have no targets: no summary for them
    assert "targets" not in merge_reports([smoke_run / "smoke.json", tmp_path / "c.json"][:1], tmp_path, tag="cpu")
    assert target_summary([cpu]) and not any(e["measured"] for e in target_summary([cpu]))


def test_flop_counter_equals_hand_count():
    b, c_in, c_out, hw, k, n_out = 2, 3, 8, 6, 3, 10
    net_fn = lambda: nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=1), nn.ReLU(), nn.Flatten(),  # noqa: E731
                                   nn.Linear(c_out * hw * hw, n_out))
    x = torch.randn(b, c_in, hw, hw)
    conv = 2 * c_in * k * k * c_out * hw * hw * b  # 2 FLOP per multiply-accumulate
    linear = 2 * c_out * hw * hw * n_out * b
    for fake in (True, False):
        assert count_flops(net_fn, lambda net: net(x), fake=fake) == conv + linear
        # backward: the conv needs only its weight gradient (input needs no grad), the linear both gradients
        assert count_flops(net_fn, lambda net: net(x).sum().backward(), fake=fake) == 2 * conv + 3 * linear


def test_flop_counter_counts_cpu_attention():
    bsz, heads, length, d = 2, 4, 16, 8
    q, k, v = (torch.randn(bsz, heads, length, d, requires_grad=True) for _ in range(3))
    fwd = 2 * 2 * bsz * heads * length * length * d  # QK^T and PV
    assert count_flops(lambda: None, lambda _: F.scaled_dot_product_attention(q, k, v), fake=False) == fwd
    # flash backward: recomputed QK^T plus dV, dP, dQ, dK: five products of the same size
    total = count_flops(lambda: None, lambda _: F.scaled_dot_product_attention(q, k, v).sum().backward(), fake=False)
    assert total == fwd + 5 * fwd // 2


def test_paper_network_gflop_equal_the_original_networks_count():
    """Counted on fake tensors (no memory, seconds), against the count taken from the original code (ANCHORS.md),
    which is given to 4 significant digits."""
    counted = {}
    for experiment in ("lsun_churches_ldm8", "celebahq_ldm4"):
        typed = compose_typed([f"experiment={experiment}"])
        counted[(experiment, "unet_forward")] = unet_flops(typed, train=False) / 1e9
        if experiment == "lsun_churches_ldm8":
            counted[(experiment, "encode")] = first_stage_flops(typed, "encode") / 1e9
            counted[(experiment, "decode")] = first_stage_flops(typed, "decode") / 1e9
    for key, original in ORIGINAL_GFLOP.items():
        assert counted[key] == pytest.approx(original, rel=2e-4), key


def test_verdicts_follow_the_stated_targets():
    h200, h100 = "NVIDIA H200", "NVIDIA H100 80GB HBM3"
    churches = TARGETS[("lsun_churches_ldm8", "train")]
    ok = {"img_per_s": churches.min_img_per_s + 1, "peak_mem_gib": 10.0}
    slow = {"img_per_s": churches.min_img_per_s - 1, "peak_mem_gib": 10.0}
    assert verdict("lsun_churches_ldm8", "train", ok, MIN_TRAIN_SPEEDUP, h200) == \
        ">= 4x eager fp32: met; >= 1300 img/s: met"
    assert verdict("lsun_churches_ldm8", "train", slow, MIN_TRAIN_SPEEDUP - 0.1, h200) == \
        ">= 4x eager fp32: missed; >= 1300 img/s: missed"
    assert "not applicable" in verdict("lsun_churches_ldm8", "train", ok, 5.0, h100)
    assert verdict("lsun_churches_ldm8", "train", ok, 5.0, h100).startswith(">= 4x eager fp32: met")
    celeb = {"img_per_s": 500.0, "peak_mem_gib": 41.0}
    assert "<= 40 GiB: missed" in verdict("celebahq_ldm4", "train", celeb, 5.0, h200)
    assert verdict("smoke", "decode", ok, 1.0, h200) == ""
    assert verdict("smoke", "train", ok, 1.0, "CPU x", device_type="cpu") == "no target on the CPU"


def test_bad_arguments_name_the_value():
    with pytest.raises(PerfError, match="bf17"):
        FastPath.parse("bf16,bf17")
    typed = compose_typed(["experiment=smoke"])
    with pytest.raises(BenchError, match="--batch"):
        settings_from_args(parse_args(["experiment=smoke", "--device", "cpu", "--batch", "0"]), typed)
    s = settings_from_args(parse_args(["experiment=smoke", "--device", "cpu", "--rows", "train,flying"]), typed)
    with pytest.raises(BenchError, match="flying"):
        run_bench(["experiment=smoke"], s, None, progress=False)


def test_fast_path_defaults_and_parsing():
    assert FastPath.parse("all").levers() == ["bf16", "channels_last", "compile", "fused_adam"]
    assert FastPath.parse("none") == FastPath.eager_fp32() and FastPath().describe() == "eager fp32"
    assert FastPath.parse("compile:max-autotune").describe() == "compile:max-autotune"
    paper = FastPath.from_trainer(compose_typed(["experiment=lsun_churches_ldm8"]).trainer)
    assert paper.levers() == ["bf16", "channels_last", "compile", "fused_adam"]
    assert FastPath.from_trainer(compose_typed(["experiment=smoke"]).trainer).levers() == []
    graphs = compose_typed(["experiment=lsun_churches_ldm8", "trainer.compile_mode=reduce-overhead"]).trainer
    assert FastPath.from_trainer(graphs).describe() == "bf16+channels_last+compile:reduce-overhead+fused_adam"
    with pytest.raises(PerfError, match="'reduce_overhead'"):
        FastPath.parse("bf16,compile:reduce_overhead")
    assert not FastPath.for_device("cpu").compile
    assert FastPath.parse("all").only("bf16", "channels_last").levers() == ["bf16", "channels_last"]


def test_timing_memory_and_peak_helpers():
    calls = []
    timing = time_fn(lambda: calls.append(1), "cpu", iters=3, warmup=2)
    assert len(calls) == 5 and timing.iters == 3 and timing.seconds_per_iter >= 0
    assert matmul_peak_tflops("cpu", torch.float32, sizes=(64, 128), seconds=0.02) > 0
    mem = PeakMemory("cpu")
    mem.reset()
    before = mem.peak_gib()
    if before is None:
        pytest.skip("no /proc peak-RSS on this platform")
    block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
    assert mem.peak_gib() - before >= 0.9 * 64 / 1024
    del block


# Kernel names as CUDA traces of these networks show them (cuDNN, cuBLAS and nvjet, FlashAttention and the
# memory-efficient kernel, inductor's Triton kernels, ATen's own), and CPU operator names.
KERNELS = {
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_"
    "execute_segment_k_off_kernel__5x_cudnn": "convolution",
    "sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize64x64x64_stage4_warpsize2x2x1_"
    "g1_tensor16x8x16_execute_kernel__5x_cudnn": "convolution",
    "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<32, 128, 128, 4, false, false, cutlass::bfloat16_t, "
    "Flash_kernel_traits<32, 128, 128, 4, cutlass::bfloat16_t> >, false, false, false, false, true, true, false, "
    "false>(pytorch_flash::Flash_fwd_params)": "attention",
    "fmha_cutlassB_f32_aligned_64x64_k32_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<cutlass::arch::Sm80, "
    "float, true, false, true, 64, 64, 32, false>::Params)": "attention",
    "nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTN": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_"
    "cublas": "matmul",
    "triton_tem_fused_addmm_0": "matmul",
    "triton_red_fused_native_group_norm_silu_3": "normalization",
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float const*, float*, "
    "float*)": "normalization",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<5>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 5, "
    "(at::native::ADAM_MODE)1, false> >": "optimizer",
    "Memcpy HtoD (Pinned -> Device)": "copy",
    "triton_poi_fused_add_mul_silu_7": "fused (inductor)",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul> >"
    "(int, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul>)": OTHER_CATEGORY,
    "aten::mkldnn_convolution": "convolution", "aten::convolution_backward": "convolution",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::addmm": "matmul",
    "aten::native_group_norm": "normalization", "aten::copy_": "copy", "aten::silu": OTHER_CATEGORY,
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_profile_categories_of_real_kernel_names(name):
    assert profile_category(name) == KERNELS[name]


def test_profile_breakdown_says_where_the_time_goes():
    """A convolution-heavy step: the profiler's operator times put most of it in convolution, shares add up."""
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(8, 16, 32, 32)
    prof = profile_breakdown(lambda: F.silu(conv(x)).sum().backward(), "cpu", iters=2)
    assert prof["iters"] == 2 and prof["busy_fraction"] is None and prof["ms_per_iter"] > 0
    assert sum(prof["categories"].values()) == pytest.approx(1.0)
    assert max(prof["categories"], key=prof["categories"].get) == "convolution"
    assert prof["top"][0]["name"].startswith("aten::") and prof["top"][0]["calls_per_iter"] >= 1
    assert [t["share"] for t in prof["top"]] == sorted((t["share"] for t in prof["top"]), reverse=True)
    with pytest.raises(MeasurementError, match="iters >= 1"):
        profile_breakdown(lambda: None, "cpu", iters=0)


@slow_without_native_bf16
def test_bench_profile_rows_and_table(tmp_path):
    """--profile N: each measured path of each row carries its breakdown, and the markdown shows it."""
    assert main(["experiment=smoke", "--device", "cpu", "--batch", "2", "--sample-batch", "2", "--steps", "1",
                 "--warmup", "1", "--sample-steps", "1", "--rows", "train,sample", "--fast", FAST, "--profile", "1",
                 "--out", str(tmp_path), "--tag", "prof", "--quiet"]) == 0
    report = json.loads((tmp_path / "prof.json").read_text())
    assert report["settings"]["profile"] == 1
    for row in report["rows"]:
        for path in ("baseline", "fast"):
            prof = row[path]["profile"]
            assert prof["categories"]["convolution"] > 0.2 and sum(prof["categories"].values()) == pytest.approx(1)
    table = (tmp_path / "prof.md").read_text()
    assert "Where the time goes" in table
    assert "| train | eager fp32 |" in table and "| sample | fast |" in table


def test_a_failed_path_is_recorded_not_fatal():
    def broken() -> None:
        raise RuntimeError("inductor failed\nlong details")

    failed = measure(broken, torch.device("cpu"), warmup=1, iters=1, images_per_call=4, gflop_per_image=1.0,
                      peak_tflops=1.0, fast=FastPath(compile=True))
    assert failed["error"] == "RuntimeError: inductor failed" and "img_per_s" not in failed
    ok = measure(lambda: None, torch.device("cpu"), warmup=0, iters=2, images_per_call=4, gflop_per_image=1.0,
                  peak_tflops=1.0, fast=FastPath())
    row = make_row("train", "step", 4, 1.0, ok, failed, "smoke", {"name": "CPU", "type": "cpu"})
    assert row["speedup"] is None
    report = {"experiment": "smoke", "device": {"name": "CPU", "torch": torch.__version__, "threads": 1},
              "created": "now", "fast_path": "compile", "rows": [row]}
    assert "RuntimeError: inductor failed" in render_markdown([report])


@slow_without_native_bf16
def test_a_run_cut_while_the_fast_path_compiles_keeps_the_rows_baseline(tmp_path):
    """The GPU check cuts each experiment at a time limit, and a cold torch.compile of a paper U-Net can outlast
    it (seen on an H200: over 3 minutes). The baseline measured before the cut must survive in the results:
    a real benchmark process is killed while inductor compiles the fast path of its first row."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cut"
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "replication.bench", "experiment=smoke", "--device", "cpu",
                             "--batch", "2", "--steps", "1", "--warmup", "1", "--rows", "train", "--fast", "compile",
                             "--threads", "1", "--out", str(out), "--tag", "cut", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    report = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            path = out / "cut.json"
            if path.exists():
                data = json.loads(path.read_text())
                if data.get("pending"):
                    report = data
                    break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert report is not None, "the baseline of the train row was never written before the fast path finished"
    assert proc.returncode == -signal.SIGKILL  # cut while compiling, as the GPU check's time limit does
    report = json.loads((out / "cut.json").read_text())
    assert report["complete"] is False and report["rows"] == []
    pending = report["pending"]
    assert pending["row"] == "train" and pending["baseline"]["img_per_s"] > 0 and pending["baseline"]["error"] is None
    text = render_markdown([report])
    assert "Row train" in text and "did not" in text and fmt(pending["baseline"]["img_per_s"]) in text


def test_repeats_that_disagree_flag_the_row_as_noisy():
    """A shared CPU gave x0.5 and x19 for the same row in two runs: each path is timed several times, and a row
    whose repeats disagree says so (here the step slows down from one repeat to the next, as under a neighbour's
    load), next to the median and the range, in the JSON, the progress line and the table."""
    import time

    calls = []

    def slowing() -> None:  # repeat k (one call each) takes (k + 1) x 10 ms: rates 400, 200, 133 img/s
        calls.append(1)
        time.sleep(0.01 * len(calls))

    noisy = measure(slowing, torch.device("cpu"), warmup=0, iters=1, images_per_call=4, gflop_per_image=1.0,
                     peak_tflops=1.0, fast=FastPath(), repeats=3)
    assert len(calls) == 3 and noisy["repeats"] == 3 and noisy["noisy"] is True
    rates = noisy["img_per_s_repeats"]
    assert rates == sorted(rates, reverse=True) and noisy["img_per_s"] == pytest.approx(4 / 0.02, rel=0.3)
    assert noisy["img_per_s"] == pytest.approx(sorted(rates)[1], rel=1e-9)  # the median repeat
    steady = dict(noisy, img_per_s=100.0, img_per_s_min=99.0, img_per_s_max=101.0, spread=0.02, noisy=False)
    row = make_row("train", "step", 4, 1.0, steady, noisy, "smoke", {"name": "CPU", "type": "cpu"})
    assert row["noisy"] is True and row["verdict"] == "no target on the CPU"
    assert row["speedup_range"] == pytest.approx([noisy["img_per_s_min"] / 101.0, noisy["img_per_s_max"] / 99.0])
    assert row["noise"].startswith("NOISY: repeats disagree (fast spread ")
    assert "NOISY" in row_line(row)
    report = {"experiment": "smoke", "device": {"name": "CPU", "torch": torch.__version__, "threads": 1},
              "created": "now", "fast_path": "none", "rows": [row]}
    table_row = next(ln for ln in render_markdown([report]).splitlines() if ln.startswith("| train |"))
    assert "| 100.0 (99.0-101.0) |" in table_row and "NOISY: repeats disagree" in table_row
    quiet = make_row("train", "step", 4, 1.0, steady, steady, "smoke", {"name": "CPU", "type": "cpu"})
    assert quiet["noisy"] is False and quiet["noise"] is None and "NOISY" not in row_line(quiet)


def test_the_sample_row_samples_with_the_sample_stages_denoiser(monkeypatch):
    """The sampling row and the sample stage's Generator build their denoiser with the same function (guided
    class-conditional smoke_cin: null class 3, scale 1.5), and an experiment without a null class but with a
    guidance scale is refused by both rather than guided against class 0."""
    import replication.diffusion.denoiser as denoiser_module
    from replication.bench.rows import measure_sample
    from replication.bench.settings import BenchSettings
    from replication.diffusion.denoiser import GuidanceError
    from replication.stages.artifacts import build_first_stage
    from replication.stages.context import StageError
    from replication.stages.sample import Generator

    built = []
    real = denoiser_module.sampling_denoiser

    def recorded(call, labels, null_class, guidance_scale, **conditions):
        built.append((labels.tolist(), null_class, guidance_scale))
        return real(call, labels, null_class, guidance_scale, **conditions)

    monkeypatch.setattr(denoiser_module, "sampling_denoiser", recorded)
    s = BenchSettings(device=torch.device("cpu"), batch=2, sample_batch=4, ae_batch=1, feature_batch=1, iters=1,
                      warmup=0, sample_steps=1, fast=FastPath(), repeats=1)
    for null_class in (3, None):
        typed = compose_typed(["experiment=smoke_cin", f"diffusion.null_class={'null' if null_class is None else 3}"])
        torch.manual_seed(0)
        unet = build_unet(typed)
        generator = Generator(unet, build_first_stage(typed), 1.0, typed, torch.device("cpu"))
        labels = torch.tensor([0, 1, 2, 0])
        if null_class is None:
            with pytest.raises(GuidanceError, match="null_class"):
                measure_sample(typed, unet, FastPath(), s, gflop_step=1.0, peak=1.0)
            with pytest.raises(StageError, match="null_class"):
                generator.denoiser(labels, 1.5)
            continue
        result, final = measure_sample(typed, unet, FastPath(), s, gflop_step=1.0, peak=1.0)
        assert result["error"] is None and final is not None
        generator.denoiser(labels, 1.5)
        assert built == [([0, 1, 2, 0], 3, 1.5), ([0, 1, 2, 0], 3, 1.5)]
    assert len(built) == 4  # the refused ones were asked too


def test_the_sampling_denoiser_guides_against_the_null_class():
    """Scale 1 is the conditional model (no null class needed); another scale mixes in the null-class branch."""
    from replication.diffusion.denoiser import GuidanceError, sampling_denoiser

    def call(x, t, y=None):
        return x * (1.0 if y is None else (y.float() + 1.0)[:, None])

    x, t, labels = torch.ones(2, 3), torch.zeros(2, dtype=torch.long), torch.tensor([0, 2])
    assert torch.equal(sampling_denoiser(call, None, None, 1.5)(x, t), x)
    assert torch.equal(sampling_denoiser(call, labels, None, 1.0)(x, t), torch.tensor([[1.0] * 3, [3.0] * 3]))
    guided = sampling_denoiser(call, labels, 5, 2.0)(x, t)  # eps_u + 2 (eps_c - eps_u), eps_u = 6
    assert torch.equal(guided, torch.tensor([[-4.0] * 3, [0.0] * 3]))
    with pytest.raises(GuidanceError, match="scale 2"):
        sampling_denoiser(call, labels, None, 2.0)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m replication.bench") and "Throughput benchmark" in text
    assert f"more than {NOISE_THRESHOLD:.0%} of the" in text and "--merge" in text and "--profile" in text
