# Benchmark: how fast this code trains and samples the paper's LDMs, measured side by side against an
# eager fp32 baseline of the same networks in the same run (speed-ups are ratios, never cross-run comparisons).
"""Throughput benchmark for one experiment's shapes.

    python -m replication.bench experiment=lsun_churches_ldm8 --device cuda --batch 96 --sample-batch 256
    python -m replication.bench experiment=smoke --device cpu --threads 1      # tiny shapes, about a minute
    python -m replication.bench --merge a.json b.json --tag nvidia-h200         # one table for several runs

Rows (each measured for the eager fp32 baseline and for the fast path, same weights, same inputs):
- train:    `TrainStep.step` of training/step.py, the step `training/ldm_trainer.train_loop` runs, on cached
            latents: forward, eps loss, backward, gradient clip, AdamW, LR schedule, EMA update, the loss read back
            one step late (no encoder: the latent cache feeds training).
- sample:   DDIM steps of the experiment's sampler at `--sample-batch` with the sample stage's denoiser
            (diffusion/denoiser.py), timed over `--sample-steps` steps and reported per image at 200 steps (each
            step is one U-Net call plus the same elementwise update, so the time is linear in the step count).
- decode / encode: the first stage at the dataset resolution (levers: bf16 + channels_last; compile with
            --compile-autoencoder).
- features: the FID feature extractor on uint8 images (lever: channels_last only; features stay fp32 because
            bf16 features would move FID).
For each: GFLOP per image (torch.utils.flop_counter on fake tensors), img/s, achieved TFLOP/s, MFU against the
bf16 matrix-multiply peak measured in this run, peak memory, and the fast/baseline ratio. Each path is timed
`--repeats` times (each `--steps` calls): the rate is the median, with the range of the repeats beside it, and a
row whose repeats disagree by more than NOISE_THRESHOLD of the median is flagged as noisy (on a shared CPU, say):
its speed-up is not to be trusted, remeasure it. With --profile N, N more
calls of each path run under torch.profiler: GPU kernel time (CPU: operator time) per category (convolution,
matmul, attention, normalization, ...) and, on CUDA, how busy the GPU is. Output:
<out>/<tag>.json and <out>/<tag>.md, rewritten after every row so a run cut short keeps what it measured.

Modules: settings (what a run measures), environment (device, versions, commit), networks (the networks and their
FLOP), measurement (timing, FLOP counting, memory, profiler, numerics), rows (each row's measurement of the real
code), targets (the targets as data, and verdicts), rendering (markdown), runner (`run_bench`), merge
(`merge_reports`), cli (`main`, behind `python -m replication.bench`).
"""
