"""Render bench/run.py's results: a markdown report and an SVG bar chart (no plotting
dependency)."""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape

VARIANT_NAMES = {
    "engine": "Infinity engine (raw, float32)",
    "engine_again": "a second Infinity engine, identical (A/A control)",
    "handler": "worker handler (float32)",
    "handler_auto": "worker handler (DTYPES=auto)",
    "sentence_transformers": "sentence-transformers encode (float32)",
}


def _g(value: float) -> str:
    return f"{value / 1e9:.0f}"


def _aa(variants: dict[str, Any]) -> tuple[str, str]:
    """The A/A control's ratio, and the handler's against the second engine; "-" for results that
    hold no second engine."""
    again = variants.get("engine_again")
    if not again:
        return "-", "-"
    return f"{again['vs_engine']:.2f}", f"{variants['handler']['vs_engine_again']:.2f}"


def summary(r: dict[str, Any]) -> list[str]:
    """The targets at a glance: one row per model and input length."""
    lines = [
        "| model | inputs | handler / engine | handler / engine, CPU time "
        "| second engine / engine (A/A) | handler / second engine "
        "| auto ({dtype}) / engine float32 | sentence-transformers / engine "
        "| engine float32 inputs/s | engine of matmul peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dtypes = {m["auto_dtype"] for m in r["models"]}
    lines[0] = lines[0].replace("{dtype}", "/".join(sorted(dtypes)) or "-")
    for model in r["models"]:
        for length, row in model["throughput"].items():
            v = row["variants"]
            aa, handler_vs_again = _aa(v)
            lines.append(
                f"| {model['model']} | {length} ({row['tokens_per_input']:.0f} tok) "
                f"| {v['handler']['vs_engine']:.2f} | {v['handler']['cpu_vs_engine']:.3f} "
                f"| {aa} | {handler_vs_again} | {v['handler_auto']['vs_engine']:.2f} "
                f"| {v['sentence_transformers']['vs_engine']:.2f} "
                f"| {v['engine']['inputs_per_s']:.1f} "
                f"| {100 * v['engine']['of_matmul_peak']:.0f}% |"
            )
    return lines


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    device = m.get("gpu", f"{m['cpu']}, {m['cores']} cores") + f" ({m['device']})"
    lines = [
        f"Measured on: {device}; torch {m['torch']} ({m['torch_threads']} threads). "
        f"Load average at start {m['load_average_start'][0]:.1f}, at end "
        f"{m.get('load_average_end', [float('nan')])[0]:.1f}.",
        f"Command: `{r['command']}` ({r['started']}). Ratios are paired medians of interleaved "
        f'rounds in this run; requests of {r["request_size"]} inputs, all sent at once. "CPU time" '
        "ratios compare the process's CPU seconds for the same work (steadier than wall time on a "
        'shared machine; they show the worker\'s own cost, not waiting). "A/A" is a second raw '
        "engine, identical to the first, measured like the others: how far apart two equal "
        "subjects land in this run, the smallest difference the row can resolve. "
        + (
            "This process ran with the worker's malloc settings (KEEP_FREED_MEMORY), "
            "as the worker does."
            if m.get("malloc_kept")
            else "This process ran with glibc's default malloc settings."
        ),
        "",
        "Matmul peak (the physical limit): "
        + ", ".join(f"{k} {_g(v)} GFLOP/s" for k, v in r["matmul_peak_flop_per_s"].items()),
        "",
        "### Summary (throughput ratios, each against the raw engine in float32)",
        "",
        *summary(r),
        "",
        "### Throughput",
        "",
        "| model | inputs | variant | dtype | inputs/s | tokens/s | x engine | x engine (CPU time) "
        "| GFLOP/s | of matmul peak |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model in r["models"]:
        for length, row in model["throughput"].items():
            label = f"{length} ({row['tokens_per_input']:.0f} tok) x{row['inputs']}"
            for variant, v in row["variants"].items():
                lines.append(
                    f"| {model['model']} | {label} | {VARIANT_NAMES[variant]} | {v['dtype']} "
                    f"| {v['inputs_per_s']:.1f} | {v['tokens_per_s']:.0f} | {v['vs_engine']:.2f} "
                    f"| {v['cpu_vs_engine']:.2f} "
                    f"| {_g(v['flop_per_s'])} | {100 * v['of_matmul_peak']:.0f}% |"
                )
    lines += [
        "",
        "DTYPES=auto on this machine: "
        + ", ".join(
            f"{m['model']} -> {m['auto_dtype']} "
            f"(min cosine to float32 {m['cosine_auto_vs_float32']:.5f})"
            for m in r["models"]
        ),
        "",
        "### Latency of one short request (one text)",
        "",
        "| model | engine p50 / p99 ms | job dispatch p50 / p99 ms "
        "| runpod handler p50 / p99 ms | added p50 ms | second engine, added p50 ms (A/A) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model in r["models"]:
        lat = model["latency"]
        cells = " | ".join(
            f"{lat[v]['p50_ms']:.2f} / {lat[v]['p99_ms']:.2f}"
            for v in ("engine", "dispatch", "handler")
        )
        aa = lat.get("engine_again_added_p50_ms")
        lines.append(
            f"| {model['model']} | {cells} | {lat['added_p50_ms']:+.2f} "
            f"| {'-' if aa is None else f'{aa:+.2f}'} |"
        )
    lines += [
        "",
        "### Cold start (process start to first answer) and peak memory (RSS)",
        "",
        "| model | raw engine s | worker (`handler.py --test_input`) s | worker / engine "
        "| engine RSS MB | worker RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in r["cold_start"].items():
        lines.append(
            f"| {name} | {c['engine']['first_answer_s']:.2f} | {c['worker']['first_answer_s']:.2f} "
            f"| {c['worker_vs_engine']:.2f} | {c['engine']['peak_rss_mb']:.0f} "
            f"| {c['worker']['peak_rss_mb']:.0f} |"
        )
    a = r.get("allocator")
    if a:
        lines += [
            "",
            "### Malloc settings (the worker's KEEP_FREED_MEMORY) against glibc's defaults",
            "",
            f"A raw {a['model']} engine in processes of its own, {a['pairs']} pairs alternated "
            "(bench/allocator_ab.py); the rows above all ran in this process, "
            "with the worker's settings.",
            "",
            "| inputs | defaults' time / kept time | page faults a round, defaults / kept "
            "| kernel CPU ms a round, defaults / kept | resident MB after, defaults / kept |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for length, row in a["rows"].items():
            lines.append(
                f"| {length} x{a['inputs'][length]} | {row['defaults_vs_kept']:.2f} "
                f"| {row['defaults_faults']:.0f} / {row['kept_faults']:.0f} "
                f"| {1e3 * row['defaults_kernel_s']:.0f} / {1e3 * row['kept_kernel_s']:.0f} "
                f"| {row['defaults_rss_mb']:.0f} / {row['kept_rss_mb']:.0f} |"
            )
    s = r["serialisation"]
    lines += [
        "",
        f"### Answer serialisation ({s['vectors'][0]} x {s['vectors'][1]} unit vectors, "
        "body through json.dumps as runpod sends it)",
        "",
        "| encoding | bytes per number | ms | exact float32 round trip |",
        "| --- | ---: | ---: | --- |",
    ]
    for key, name in (
        ("float_tolist", "float via tolist() (float32 widened)"),
        ("float_worker", "float, the worker's (shortest round-trip text)"),
        ("base64_worker", "base64, the worker's"),
    ):
        lines.append(
            f"| {name} | {s[key]['bytes_per_number']:.2f} | {s[key]['ms']:.1f} "
            f"| {s[key]['exact']} |"
        )
    lines.append(
        f"\nbase64 is {s['base64_speedup_vs_float_worker']:.1f}x faster to produce than float."
    )
    if r.get("failed"):
        lines += ["", "### Not measured", ""]
        lines += [f"- {name}: {why.splitlines()[0]}" for name, why in r["failed"].items()]
    lines += ["", "### Local HTTP server (one text per request)", ""]
    server = r["server"]
    if "skipped" in server:
        lines.append(f"Skipped: {server['skipped']}.")
    else:
        lines += [
            "`python handler.py --serve` in its own process (float32), keep-alive HTTP clients in "
            "the benchmark's process on the same CPU; the raw engine in the benchmark's process.",
            "",
            "| inputs | concurrency | engine req/s | server req/s | server / engine "
            "| second engine / engine (A/A) | client CPU ms per request |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, v in server.items():
            length, concurrency = key.split(" c")
            aa = v.get("engine_again_vs_engine")
            lines.append(
                f"| {length} | {concurrency} | {v['engine_rps']:.0f} | {v['server_rps']:.0f} "
                f"| {v['server_vs_engine']:.2f} | {'-' if aa is None else f'{aa:.2f}'} "
                f"| {v['client_cpu_ms_per_request']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def svg_chart(r: dict[str, Any]) -> str:
    """Horizontal bars: each variant's throughput relative to the raw engine (1.0 = engine)."""
    colours = {
        "engine": "#9e9e9e",
        "engine_again": "#cfcfcf",
        "handler": "#1f77b4",
        "handler_auto": "#2ca02c",
        "sentence_transformers": "#ff7f0e",
    }
    rows = []
    for model in r["models"]:
        for length, row in model["throughput"].items():
            rows.append((f"{model['model']} {length}", row["variants"]))
    bar, gap, left, width = 11, 10, 150, 420
    per_row = bar * len(colours) + gap
    top = 40
    height = top + per_row * len(rows) + 30
    top_ratio = max([2.0] + [v["vs_engine"] for _, vs in rows for v in vs.values()])
    scale = width / top_ratio
    svg_width = max(left + width + 60, left + 135 * len(colours))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{svg_width}" '
        f'height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="14" font-size="13">Throughput relative to the raw Infinity engine '
        f"({escape(r['machine']['device'])})</text>",
    ]
    for i, (variant, colour) in enumerate(colours.items()):
        out.append(
            f'<rect x="{left + i * 135}" y="22" width="10" height="10" fill="{colour}"/>'
            f'<text x="{left + i * 135 + 14}" y="31">{escape(variant)}</text>'
        )
    y = top
    for label, variants in rows:
        out.append(
            f'<text x="{left - 6}" y="{y + per_row / 2}" text-anchor="end">{escape(label)}</text>'
        )
        for variant, colour in colours.items():
            if variant in variants:
                ratio = variants[variant]["vs_engine"]
                out.append(
                    f'<rect x="{left}" y="{y}" width="{ratio * scale:.1f}" height="{bar - 1}" '
                    f'fill="{colour}"/><text x="{left + ratio * scale + 3:.1f}" y="{y + bar - 2}">'
                    f"{ratio:.2f}</text>"
                )
            y += bar
        y += gap
    x1 = left + scale
    out.append(
        f'<line x1="{x1:.1f}" y1="{top - 4}" x2="{x1:.1f}" y2="{y}" stroke="#000" '
        'stroke-dasharray="3,3"/>'
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"
