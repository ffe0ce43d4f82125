"""The CPU image: its size against its layers', and its cold start against the host process's.

    .venv/bin/python -m bench.image [--report bench/results/image.json] [--build] [--rounds 5]

Reads the report `python -m builder.image` writes (builds the image first with --build, or when
there is no report): the image's layers, each with its share, against the files they unpack to, and,
unless --no-compressed, the gzip size a registry stores and RunPod pulls (`buildah push` to an OCI
folder). Then it starts the worker --rounds times on the host (the virtual environment) and in the
image (its CMD, load-balancing mode), alternating, on the default configuration (the bundled all-
MiniLM-L6-v2, nothing set), and times each from the process start to /ping 200 and to its first
/v1/embeddings answer: the ratio is container / host, medians, from the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import RESULTS
from builder import image as image_tool
from builder.image.report import Image, ServerRun
from embedding_worker.config import DEFAULT_MODEL_ID


def compressed_layers(tag: str) -> list[int]:
    """Each layer's size as `buildah push` compresses it (gzip), base first."""
    with tempfile.TemporaryDirectory(prefix="image-oci.") as tmp:
        subprocess.run(
            ["buildah", "push", "--quiet", tag, f"oci:{tmp}"], check=True, capture_output=True
        )
        index = json.loads((Path(tmp) / "index.json").read_text())
        digest = index["manifests"][0]["digest"].split(":", 1)[1]
        manifest = json.loads((Path(tmp) / "blobs" / "sha256" / digest).read_text())
        return [int(layer["size"]) for layer in manifest["layers"]]


def starts(image: Image, rounds: int) -> dict[str, list[ServerRun]]:
    """Alternating cold starts, host first in odd rounds and the container first in even ones."""
    times: dict[str, list[ServerRun]] = {"host": [], "container": []}
    with (
        tempfile.TemporaryDirectory(prefix="image-bench.") as tmp,
        image_tool.container(image.tag) as ctr,
    ):
        for round_ in range(rounds):
            order = ["host", "container"] if round_ % 2 == 0 else ["container", "host"]
            for side in order:
                if side == "host":
                    result = image_tool.start_on_host({}, {}, Path(tmp), DEFAULT_MODEL_ID, [])
                else:
                    result = image_tool.start_in_container(image, ctr, {}, {}, DEFAULT_MODEL_ID, [])
                if result.embeddings.status != 200:
                    raise SystemExit(f"{side}: no answer: {result.embeddings}")
                times[side].append(result)
                print(
                    f"round {round_ + 1} {side}: ready {result.ready_s:.2f} s, "
                    f"first answer {result.first_answer_s:.2f} s",
                    flush=True,
                )
    return times


def gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def size_table(report: dict[str, Any], compressed: list[int] | None) -> list[str]:
    image = report["image"]
    total = image["layers_bytes"]
    rows = ["| Layer (build step) | Size | Share | Compressed |", "| --- | --- | --- | --- |"]
    for i, layer in enumerate(image["layers"]):
        step = layer["step"].split(" -c ", 1)[-1].replace("|", "\\|")[:70] or "(base)"
        packed = gb(compressed[i]) if compressed and len(compressed) == len(image["layers"]) else ""
        rows.append(
            f"| `{step}` | {gb(layer['bytes'])} | {layer['bytes'] / total:.1%} | {packed} |"
        )
    rows.append(
        f"| all layers | {gb(total)} | 100% | {gb(sum(compressed)) if compressed else ''} |"
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.image", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--report", type=Path, default=RESULTS / "image.json")
    parser.add_argument("--build", action="store_true", help="run python -m builder.image first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compressed", action="store_true")
    args = parser.parse_args(argv)

    if args.build or not args.report.exists():
        status = image_tool.main(["--report", str(args.report)])
        if status != 0:
            return int(status)
    report = json.loads(args.report.read_text())
    image, traces = report["image"], report["traces"]
    compressed = None if args.no_compressed else compressed_layers(image["tag"])
    times = starts(Image.from_json(image), args.rounds)

    def median(side: str, key: str) -> float:
        return statistics.median(getattr(run, key) for run in times[side])

    summary = {
        "tag": image["tag"],
        "layers_bytes": image["layers_bytes"],
        "rootfs_bytes": traces["rootfs_bytes"],
        "layers_over_files": image["layers_bytes"] / traces["rootfs_bytes"],
        "compressed_bytes": sum(compressed) if compressed else None,
        "rounds": args.rounds,
        "ready_s": {side: median(side, "ready_s") for side in times},
        "first_answer_s": {side: median(side, "first_answer_s") for side in times},
        "all_first_answers_s": {side: [r.first_answer_s for r in times[side]] for side in times},
        "report_first_answer_s": {
            side: report["servers"][side]["first_answer_s"] for side in ("host", "container")
        },
    }
    ratio = summary["first_answer_s"]["container"] / summary["first_answer_s"]["host"]
    summary["first_answer_ratio"] = ratio
    # Each round's two starts ran back to back, under the same load from elsewhere.
    paired = statistics.median(
        c.first_answer_s / h.first_answer_s for c, h in zip(times["container"], times["host"])
    )
    summary["paired_ratio"] = paired
    lines = [
        *size_table(report, compressed),
        "",
        f"Layers {gb(image['layers_bytes'])} against {gb(traces['rootfs_bytes'])} of files: "
        f"{summary['layers_over_files']:.3f}"
        + (f"; compressed {gb(sum(compressed))}" if compressed else ""),
        f"Start to first answer (median of {args.rounds}, bundled MiniLM): container "
        f"{summary['first_answer_s']['container']:.2f} s / host "
        f"{summary['first_answer_s']['host']:.2f} s = {ratio:.2f} (paired by round: {paired:.2f});"
        " to /ping 200: "
        f"{summary['ready_s']['container']:.2f} / {summary['ready_s']['host']:.2f} s",
        f"The build script's run (tests.json's two models): container "
        f"{summary['report_first_answer_s']['container']:.2f} s, host "
        f"{summary['report_first_answer_s']['host']:.2f} s",
    ]
    print("\n".join(lines))
    out = args.report.with_name("image-bench.json")
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
