"""Build the worker's CPU image with buildah and check it from the inside, as RunPod runs it.

    python -m builder.image [--report FILE] [--tag TAG] [--cache-dir DIR]

Run it as root, from the repository's root, with the repository's virtual environment (the host side
of the comparison runs the same worker from it). In order, it:

1. installs buildah and debootstrap with apt-get when they are absent;
2. makes the local base image, Debian 12 (bookworm, whose python3 is 3.11) from debootstrap, since
   no registry can be reached: the root file system is cached as a tarball, the base as an image;
3. builds the repository's Dockerfile with the bundled all-MiniLM-L6-v2 as the baked model; pip in
   the build gets the machine's CA bundle and local wheels (the CPU torch) through read-only
   mounts on folders the base already has, so neither leaves a file, a path or a variable behind;
   a random canary is passed as the hf_token build secret;
4. checks the image: no host path, variable or canary in its configuration, history or files; the
   user it runs as and the folders that user must read and write;
5. runs the image's CMD twice: once as RunPod's local test (`python handler.py` answering
   test_input.json), once as a load-balancing endpoint (the HTTP server) with .runpod/tests.json's
   configuration, a local stand-in for each of its models that cannot be downloaded: /ping, one
   /v1/embeddings compared with the same worker started on the host, every tests.json case
   through /runsync; each start is timed to its first answer, the host's too.

It writes a JSON report (sizes, layers, timings, answers) and exits 0 when every check passed, 1
when one failed, 77 when buildah cannot be installed here (not root, or no apt-get).

One module a step: commands.py (running commands, buildah's containers, step 1), base.py (2),
build.py (3), check.py (4), serve.py (5); report.py is the typed report they fill and cli.py runs
them in order.
"""

from __future__ import annotations

from .cli import DEFAULT_CACHE, DEFAULT_REPORT, SKIP, main
from .commands import container
from .report import Report
from .serve import start_in_container, start_on_host

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_REPORT",
    "SKIP",
    "Report",
    "container",
    "main",
    "start_in_container",
    "start_on_host",
]
