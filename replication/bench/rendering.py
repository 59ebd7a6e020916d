"""The benchmark's results as markdown: one table per run, the profiler breakdowns, the numerics and FLOP checks,
and across runs the summary against the targets."""
from __future__ import annotations

from typing import Any, Sequence

from replication.bench.measurement import OTHER_CATEGORY, PROFILE_CATEGORIES
from replication.bench.settings import NOISE_THRESHOLD, SAMPLE_QUOTE_STEPS
from replication.bench.targets import TARGET_CARD, target_summary


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.2g}"
        return f"{value:,.{digits}f}"
    return str(value)


def _rate(mode: dict[str, Any]) -> str:
    """The median rate, with the range of the repeats when there were several: '120.5 (98.2-131.0)'."""
    if mode.get("error"):
        return mode["error"]
    text = fmt(mode.get("img_per_s"))
    if (mode.get("repeats") or 1) > 1 and mode.get("img_per_s_min") is not None:
        text += f" ({fmt(mode['img_per_s_min'])}-{fmt(mode['img_per_s_max'])})"
    return text


def _speedup(row: dict[str, Any]) -> str:
    text = fmt(row["speedup"], 2)
    spread = row.get("speedup_range")
    if spread and row["speedup"] is not None and spread[1] - spread[0] > 1e-12:
        text += f" ({fmt(spread[0], 2)}-{fmt(spread[1], 2)})"
    return text


def row_line(row: dict[str, Any]) -> str:
    line = (f"[bench]   {row['row']}: eager fp32 {_rate(row['baseline'])} img/s, fast {_rate(row['fast'])} img/s, "
            f"x{_speedup(row)}, MFU {fmt((row['fast'].get('mfu') or 0) * 100)}%")
    return line + (f"; {row['noise']}" if row.get("noise") else "")


INTRO = ("Eager fp32 baseline and fast path measured side by side in the same run; speed-ups are ratios of the two. "
         "MFU = achieved TFLOP/s / the bf16 matrix-multiply peak measured in the same run (on a shared CPU that "
         "peak is noisy and MFU can exceed 100%). GFLOP counted with torch.utils.flop_counter (2 per "
         "multiply-accumulate; matmuls, convolutions, attention). Sampling is quoted per image at "
         f"{SAMPLE_QUOTE_STEPS} DDIM steps. Rates are the median of the repeated timings (the settings' `repeats`), "
         "with their range in brackets; a speed-up's range pairs the extremes. A row whose repeats span more than "
         f"{NOISE_THRESHOLD:.0%} of their median is marked NOISY: remeasure it before trusting it. "
         "Regenerate: `python -m replication.bench experiment=NAME` with the JSON's `settings`.")
TABLE_HEAD = ("| row | what | batch | GFLOP/img | eager fp32 img/s | fast img/s | speed-up | fast levers | fast TFLOP/s "
              "| MFU eager | MFU fast | peak GiB eager / fast | fast warm-up s | original code (H200) | verdict |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _pct(mode: dict[str, Any]) -> str:
    return f"{fmt(mode['mfu'] * 100)}%" if mode.get("mfu") is not None else "-"


def _table_row(row: dict[str, Any]) -> str:
    b, f, t = row["baseline"], row["fast"], row.get("target")
    original = "-"
    if t:
        original = f"{fmt(t['original_img_per_s'])} img/s"
        if t.get("original_mem_gib"):
            original += f", {fmt(t['original_mem_gib'])} GiB"
    memory = f"{fmt(b.get('peak_mem_gib'), 2)} / {fmt(f.get('peak_mem_gib'), 2)}"
    cells = [row["row"], row["what"], row["batch"], fmt(row["gflop_per_img"], 2), _rate(b), _rate(f),
             _speedup(row), "+".join(f.get("levers", [])), fmt(f.get("tflops"), 2), _pct(b), _pct(f),
             memory, fmt(f.get("warmup_seconds")), original,
             "; ".join(v for v in (row.get("verdict"), row.get("noise")) if v) or "-"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _section(rep: dict[str, Any]) -> list[str]:
    dev = rep["device"]
    lines = [f"## {rep['experiment']} on {dev['name']}", "",
             f"{rep['created']}, torch {dev['torch']}, commit {rep.get('git_commit') or '-'}, {dev.get('threads')} "
             f"threads. bf16 matmul peak measured: {fmt(rep.get('peak_bf16_tflops'), 2)} TFLOP/s (fp32 "
             f"{fmt(rep.get('peak_fp32_tflops'), 2)}). Fast path: {rep['fast_path']}.", "", TABLE_HEAD]
    lines += [_table_row(row) for row in rep["rows"]]
    if not rep.get("complete", True):
        lines += ["", f"INCOMPLETE: the run stopped (time limit or error) before rows "
                  f"{', '.join(r for r in rep['settings']['rows'] if r not in {x['row'] for x in rep['rows']})}."]
        pending = rep.get("pending")
        if pending:
            b = pending["baseline"]
            lines += [f"Row {pending['row']} ({pending['what']}, batch {pending['batch']}): the eager fp32 baseline "
                      f"finished ({_rate(b)} img/s, MFU {_pct(b)}, peak {fmt(b.get('peak_mem_gib'), 2)} GiB); the "
                      f"fast path ({rep['fast_path']}) did not (still compiling or running when the run stopped)."]
    lines += _profile_lines(rep["rows"])
    if rep.get("numerics"):
        errors = ", ".join(f"{k} {fmt(v, 4)}" for k, v in rep["numerics"].items())
        lines += ["", "Fast path vs eager fp32 on the same weights and inputs, relative L2 error (train: of the first "
                  f"step's loss; sample: of the latents after the timed steps; others: of the outputs): {errors}."]
    if rep.get("gflop_check"):
        checks = ", ".join(f"{k} {fmt(v['counted'], 2)} vs {fmt(v['original_code'], 2)}"
                           for k, v in rep["gflop_check"].items())
        lines += ["", f"GFLOP/img against the original networks' count (shared/ANCHORS.md): {checks}."]
    kinds = sorted({m["peak_mem_kind"] for r in rep["rows"] for m in (r["baseline"], r["fast"])
                    if m.get("peak_mem_kind")})
    if kinds:
        lines += ["", f"Peak memory: {', '.join(kinds)} during the timed iterations."]
    return lines + [""]


PROFILE_COLUMNS = tuple(name for name, _ in PROFILE_CATEGORIES) + (OTHER_CATEGORY,)


def _profile_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The rows' torch.profiler breakdowns (bench --profile), one table line per measured path."""
    paths = (("baseline", "eager fp32"), ("fast", "fast"))
    profiled = [(row, label, row[path]) for row in rows for path, label in paths
                if row[path].get("profile") or row[path].get("profile_error")]
    if not profiled:
        return []
    kinds = sorted({m["profile"]["time_kind"] for _, _, m in profiled if m.get("profile")})
    lines = ["", f"Where the time goes (torch.profiler, share of the {' / '.join(kinds) or 'profiled time'} per "
             "category; busy = GPU kernel time / unprofiled wall time per call, well below 100% means the GPU "
             "waits for the host):", "",
             "| row | path | ms/call profiled | busy | " + " | ".join(PROFILE_COLUMNS) + " | top 3 |",
             "|---|---|---|---|" + "---|" * len(PROFILE_COLUMNS) + "---|"]
    for row, label, mode in profiled:
        prof = mode.get("profile")
        if not prof:
            lines.append(f"| {row['row']} | {label} | profiler failed: {mode['profile_error']} |")
            continue
        busy = f"{fmt(prof['busy_fraction'] * 100)}%" if prof.get("busy_fraction") is not None else "-"
        shares = [f"{fmt(prof['categories'].get(c, 0.0) * 100)}%" for c in PROFILE_COLUMNS]
        top = "; ".join(f"{t['name'][:60]} {fmt(t['share'] * 100)}%" for t in prof["top"][:3]).replace("|", "/")
        lines.append("| " + " | ".join([row["row"], label, fmt(prof["ms_per_iter"], 2), busy, *shares, top]) + " |")
    return lines


def _summary_lines(summary: Sequence[dict[str, Any]]) -> list[str]:
    lines = [f"## Targets (one {TARGET_CARD}, paper shapes): the fastest measured fast path per row", "",
             "| experiment | row | original code | target | eager fp32 img/s | fast img/s | speed-up (same run) | MFU "
             "| peak GiB | fast levers | run | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        t = e["target"]
        original = f"{fmt(t['original_img_per_s'])} img/s" + (
            f", {fmt(t['original_mem_gib'])} GiB" if t.get("original_mem_gib") else "")
        goal = f">= {fmt(t['min_img_per_s'])} img/s" + (f", <= {fmt(t['max_mem_gib'])} GiB"
                                                        if t.get("max_mem_gib") else "")
        if e["measured"]:
            cells = [fmt(e["eager_img_per_s"]), fmt(e["fast_img_per_s"]), fmt(e["speedup"], 2),
                     f"{fmt((e['mfu'] or 0) * 100)}%", fmt(e["peak_mem_gib"], 2), "+".join(e["levers"] or []),
                     e["run_created"], "; ".join(v for v in (e["verdict"], e.get("noise")) if v) or "-"]
        else:
            cells = ["-", "-", "-", "-", "-", "-", "-", "not measured"]
        lines.append("| " + " | ".join([e["experiment"], e["row"], original, goal, *map(str, cells)]) + " |")
    return lines + [""]


def render_markdown(reports: Sequence[dict[str, Any]]) -> str:
    lines = ["# Throughput benchmark", "", INTRO, ""]
    if len(reports) > 1 and any(rep["device"].get("type") == "cuda" for rep in reports):
        lines += _summary_lines(target_summary(reports))
    for rep in reports:
        lines += _section(rep)
    return "\n".join(lines)
