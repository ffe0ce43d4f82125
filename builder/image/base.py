"""Step 2, the local base image: Debian 12 (bookworm, whose python3 is 3.11) from debootstrap,
since no registry can be reached. The root file system is cached as a tarball, the base as an
image."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .commands import CheckFailed, image_exists, log, run
from .report import Base

__all__ = ["BASE_TAG", "PIP_CONF_MOUNT", "WHEELS_MOUNT", "ensure_base"]

BASE_TAG = "localhost/embedding-worker-base:bookworm"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# Folders every Debian base has, empty: a read-only mount on one leaves nothing in a layer (a mount
# point buildah has to create stays in the layer as an empty file or folder). pip reads its
# site-wide settings from /etc/xdg/pip/pip.conf; the local base carries that folder empty.
PIP_CONF_MOUNT = "/etc/xdg/pip"
WHEELS_MOUNT = "/mnt"


def make_rootfs_tarball(tarball: Path) -> None:
    """Debian's minimal root file system, with the empty folder pip's mounted settings go on."""
    for stale in tarball.parent.glob("rootfs.*"):  # an interrupted earlier run
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=tarball.parent, prefix="rootfs.") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"debootstrap --variant=minbase {SUITE} ({MIRROR})")
        run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), MIRROR])
        for leftover in ("var/lib/apt/lists", "var/cache/apt", "var/log"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        (rootfs / PIP_CONF_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."])
        partial.rename(tarball)


def ensure_base(cache_dir: Path) -> Base:
    started = time.monotonic()
    tarball = cache_dir / f"debian-{SUITE}-minbase.tar"
    if image_exists(BASE_TAG):
        source = "image cached"
    else:
        source = "tarball cached" if tarball.exists() else "debootstrap"
        if not tarball.exists():
            make_rootfs_tarball(tarball)
        container = run(["buildah", "from", "scratch"]).stdout.strip()
        try:
            run(["buildah", "add", container, str(tarball), "/"])
            run(
                [
                    "buildah",
                    "config",
                    "--env",
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--cmd",
                    "/bin/bash",
                    "--label",
                    f"org.opencontainers.image.description=Debian {SUITE} minbase (debootstrap)",
                    container,
                ]
            )
            run(["buildah", "commit", "--rm", container, BASE_TAG])
        except CheckFailed:
            subprocess.run(["buildah", "rm", container], capture_output=True)
            raise
    return Base(tag=BASE_TAG, source=source, seconds=round(time.monotonic() - started, 1))
