"""Step 3, the build: the repository's Dockerfile with buildah, on the local base. pip in the build
gets the machine's CA bundle and local wheels (the CPU torch) through read-only mounts on folders
the base already has, so neither leaves a file, a path or a variable behind; the model token is a
build secret. Then what the build made: the image's configuration and its layers' sizes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .base import PIP_CONF_MOUNT, WHEELS_MOUNT
from .commands import ISOLATION, ROOT, CheckFailed, inspect, log, run
from .report import Build, Image, Layer

__all__ = ["DEFAULT_TAG", "build", "describe", "pip_settings"]

DEFAULT_TAG = "localhost/embedding-worker:cpu"
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-*.whl"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"


def pip_settings() -> tuple[Path | None, Path | None]:
    """The CA bundle and the folder of local wheels that this machine's pip uses, if any."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    values: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        values.setdefault(key.rsplit(".", 1)[-1], []).append(value.strip("'\""))
    certs = [*values.get("cert", []), os.environ.get("PIP_CERT", "")]
    cert = next((Path(c) for c in certs if c and Path(c).is_file()), None)
    links = [p for v in values.get("find-links", []) for p in v.split()]
    wheels = next(
        (Path(p) for p in links if Path(p).is_dir() and any(Path(p).glob(TORCH_WHEEL))), None
    )
    return cert, wheels


def build(tag: str, base: str, model_names: str, canary: str, work: Path, log_file: Path) -> Build:
    cert, wheels = pip_settings()
    conf_dir = work / "pip"
    conf_dir.mkdir()
    lines = ["[global]"]
    if cert is not None:
        shutil.copyfile(cert, conf_dir / "host-ca.crt")
        lines.append(f"cert = {PIP_CONF_MOUNT}/host-ca.crt")
    mounts = ["-v", f"{conf_dir}:{PIP_CONF_MOUNT}:ro"]
    if wheels is not None:
        lines.append(f"find-links = {WHEELS_MOUNT}")
        mounts += ["-v", f"{wheels}:{WHEELS_MOUNT}:ro"]
    (conf_dir / "pip.conf").write_text("\n".join(lines) + "\n")
    # With the local CPU wheel mounted, PyPI's index is enough (pip prefers 2.13.0+cpu over the
    # index's 2.13.0); without it the CPU index is the only way to the CPU build.
    torch_index = PYPI if wheels is not None else CPU_TORCH_INDEX
    secret = work / "hf_token"
    secret.write_text(canary)
    cmd = [
        "buildah",
        "bud",
        *ISOLATION,
        "--format",
        "docker",  # the OCI format drops SHELL (pipefail)
        "--layers",  # the layer cache: a second build reruns only what changed
        "--pull=false",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"TORCH_INDEX_URL={torch_index}",
        "--build-arg",
        f"MODEL_NAMES={model_names}",
        "--secret",
        f"id=hf_token,src={secret}",
        *mounts,
        "-t",
        tag,
        "-f",
        str(ROOT / "Dockerfile"),
        str(ROOT),
    ]
    log(f"buildah bud -t {tag} (log: {log_file})")
    started = time.monotonic()
    with log_file.open("w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - started
    text = log_file.read_text()
    if proc.returncode != 0:
        raise CheckFailed(f"buildah bud exited {proc.returncode}:\n{text[-3000:]}")
    return Build(
        seconds=round(seconds, 1),
        steps_cached=text.count("Using cache"),
        torch_index=torch_index,
        local_wheels=wheels is not None,
        host_ca=cert is not None,
        mounts=[m for m in mounts if m != "-v"],
        log=str(log_file),
    )


def layer_sizes(image_id: str) -> list[int]:
    """Each layer's uncompressed size, base first, from buildah's storage (overlay or vfs)."""
    info = json.loads(run(["buildah", "info"]).stdout)
    store = Path(info["store"]["GraphRoot"])
    driver = info["store"]["GraphDriverName"]
    images = json.loads((store / f"{driver}-images" / "images.json").read_text())
    layers = {
        entry["id"]: entry
        for entry in json.loads((store / f"{driver}-layers" / "layers.json").read_text())
    }
    image = next(i for i in images if i["id"] == image_id)
    sizes = []
    layer = layers.get(image["layer"])
    while layer is not None:
        sizes.append(int(layer.get("diff-size", 0)))
        layer = layers.get(layer.get("parent", ""))
    return sizes[::-1]


def describe(tag: str) -> Image:
    """The image's configuration, history and layers, as buildah stores them."""
    data = inspect(tag)
    config = data["Docker"]["config"]
    history = data["Docker"].get("history", [])
    sizes = layer_sizes(data["FromImageID"])
    steps = [h.get("created_by", "") for h in history if not h.get("empty_layer")]
    if len(steps) != len(sizes):  # the history does not line up: keep the sizes alone
        steps = [""] * len(sizes)
    return Image(
        tag=tag,
        id=data["FromImageID"],
        user=config.get("User"),
        cmd=config.get("Cmd") or [],
        workdir=config.get("WorkingDir"),
        env=config.get("Env", []),
        history=[h.get("created_by", "") for h in history],
        layers=[Layer(bytes=size, step=step) for size, step in zip(sizes, steps)],
        layers_bytes=sum(sizes),
    )
