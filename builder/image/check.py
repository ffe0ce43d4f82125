"""Step 4, checks inside the image: no host path, variable or canary in its configuration, history
or files; the user it runs as and the folders that user must read and write."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from .base import PIP_CONF_MOUNT, WHEELS_MOUNT
from .build import pip_settings
from .commands import ISOLATION, inspect, run
from .report import Image, Traces, User

__all__ = ["check_traces", "check_user"]


def pem_blocks(text: str) -> set[str]:
    blocks = text.split("-----BEGIN CERTIFICATE-----")[1:]
    return {b.split("-----END CERTIFICATE-----")[0].strip() for b in blocks}


def check_traces(image: Image, ctr: str, canary: str, host_paths: list[str]) -> Traces:
    """Nothing of the build's mounts and secret is left: not in the configuration, not in a file."""
    config_text = json.dumps(inspect(image.tag)["Docker"])  # config and history, as pushed
    needles_in_config = [
        n
        for n in [canary, *host_paths, "PIP_CERT", "PIP_FIND_LINKS", "host-ca.crt"]
        if n in config_text
    ]
    rootfs = Path(run(["buildah", "mount", ctr]).stdout.strip())
    try:
        leftovers = [
            str(p.relative_to(rootfs))
            for folder in (PIP_CONF_MOUNT, WHEELS_MOUNT, "/run/secrets")
            if (rootfs / folder.lstrip("/")).is_dir()
            for p in (rootfs / folder.lstrip("/")).iterdir()
        ]
        # Certificates the host trusts beyond the image's own bundle (a proxy's CA, say) must not
        # have come into the image with the mounted bundle.
        host_bundle = Path(pip_settings()[0] or "/nonexistent")
        image_bundle = rootfs / "etc/ssl/certs/ca-certificates.crt"
        host_only = []
        if host_bundle.is_file() and image_bundle.is_file():
            host_only = sorted(
                pem_blocks(host_bundle.read_text()) - pem_blocks(image_bundle.read_text())
            )
        # A line of the image's own bundle is the control: the search must find it.
        control = (
            sorted(pem_blocks(image_bundle.read_text()))[0].splitlines()[1]
            if image_bundle.is_file()
            else ""
        )
        secret_needles = [canary] + [
            block.splitlines()[len(block.splitlines()) // 2] for block in host_only
        ]
        needle_file = Path(tempfile.mkstemp(prefix="needles.")[1])
        needle_file.write_text("\n".join([*secret_needles, control]) + "\n")
        try:
            grep = subprocess.run(
                ["grep", "-rFoa", "--no-messages", "-f", str(needle_file), str(rootfs)],
                capture_output=True,
                text=True,
                errors="replace",
            )
        finally:
            needle_file.unlink()
        hits = [line.rsplit(":", 1) for line in grep.stdout.splitlines() if ":" in line]
        files_with_needles = sorted(
            {str(Path(path).relative_to(rootfs)) for path, match in hits if match in secret_needles}
        )
        control_found = bool(control) and any(match == control for _, match in hits)
        du = run(["du", "-sb", "--apparent-size", str(rootfs)]).stdout.split()[0]
    finally:
        subprocess.run(["buildah", "umount", ctr], capture_output=True)
    return Traces(
        in_config=needles_in_config,
        mount_leftovers=leftovers,
        host_only_certs=len(host_only),
        files_with_secrets=files_with_needles,
        rootfs_bytes=int(du),
        searched=grep.returncode in (0, 1),
        control_found=control_found,
    )


WHO = """
import json, os, pathlib, huggingface_hub.constants as c
home = pathlib.Path.home()
def writable(p):
    p = pathlib.Path(p); p.mkdir(parents=True, exist_ok=True)
    probe = p / ".probe"; probe.write_text("x"); probe.unlink(); return True
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "home": str(home),
    "hf_cache": c.HF_HUB_CACHE, "hf_cache_writable": writable(c.HF_HUB_CACHE),
    "infinity_home_writable": writable(os.environ["INFINITY_HOME"]),
    "tmp_writable": writable("/tmp"), "models_dir": os.environ.get("MODELS_DIR"),
    "app_writable": os.access("/app", os.W_OK)}))
"""


def check_user(ctr: str) -> User:
    """Who the image runs as, and whether the folders that user writes are writable."""
    who = run(["buildah", "run", *ISOLATION, ctr, "--", "python", "-c", WHO]).stdout
    return User(**json.loads(who))
