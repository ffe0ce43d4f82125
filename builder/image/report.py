"""The report of one run, typed: one dataclass per step, written as JSON (`Report.to_json`) with
the keys the test suite and bench/image.py read.

A step that did not run (an earlier one failed) is None and left out of the JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Answer",
    "Base",
    "Build",
    "Case",
    "Handler",
    "Image",
    "Layer",
    "Report",
    "ServerRun",
    "Servers",
    "Tools",
    "Traces",
    "User",
]


@dataclass
class Tools:
    installed: list[str]  # what apt-get installed in this run
    seconds: float
    buildah: str  # `buildah --version`


@dataclass
class Base:
    tag: str
    source: str  # "image cached", "tarball cached" or "debootstrap"
    seconds: float


@dataclass
class Build:
    seconds: float
    steps_cached: int
    torch_index: str
    local_wheels: bool
    host_ca: bool
    mounts: list[str]  # host:image[:ro] of each read-only mount the build had
    log: str


@dataclass
class Layer:
    bytes: int  # uncompressed
    step: str  # the history line that made it; empty where the history does not line up


@dataclass
class Image:
    tag: str
    id: str
    user: str | None
    cmd: list[str]
    workdir: str | None
    env: list[str]
    history: list[str]
    layers: list[Layer]
    layers_bytes: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Image:
        return cls(**{**data, "layers": [Layer(**layer) for layer in data["layers"]]})

    @property
    def models_dir(self) -> str:
        """Where the image looks for baked models."""
        found = (e.split("=", 1)[1] for e in self.env if e.startswith("MODELS_DIR="))
        return next(found, "/models")


@dataclass
class Traces:
    in_config: list[str]  # secrets and host paths found in the configuration or history
    mount_leftovers: list[str]  # files left in the folders the build mounted over
    host_only_certs: int  # certificates the host trusts that the image's bundle lacks
    files_with_secrets: list[str]
    rootfs_bytes: int
    searched: bool  # the file search ran
    control_found: bool  # and found its control, a line of the image's own bundle


@dataclass
class User:
    """Who the image runs as and what it may write, as seen from inside."""

    uid: int
    gid: int
    home: str
    hf_cache: str
    hf_cache_writable: bool
    infinity_home_writable: bool
    tmp_writable: bool
    models_dir: str | None
    app_writable: bool


@dataclass
class Handler:
    """The image's CMD as RunPod's local test."""

    rc: int
    seconds: float
    completed: bool
    answer: str  # the "Job result:" line
    output_tail: str


@dataclass
class Answer:
    status: int
    body: Any  # the JSON answer, or its text where it is not JSON

    def b64_vectors(self) -> list[str]:
        body = self.body if isinstance(self.body, dict) else {}
        return [item["embedding"] for item in body.get("data") or []]


@dataclass
class Case:
    name: str  # a .runpod/tests.json test
    http_status: int
    answer: Any


@dataclass
class ServerRun:
    """A worker started in load-balancing mode, timed from its start."""

    pings: list[int]  # each new /ping status while it loads
    first_ping_s: float
    ready_s: float  # /ping 200
    first_answer_s: float
    embeddings: Answer
    cases: list[Case]
    output_tail: str


@dataclass
class Servers:
    config: dict[str, str]  # tests.json's environment
    stand_ins: list[str]
    embed_request: dict[str, Any]
    host: ServerRun
    container: ServerRun
    vectors_equal: bool
    vectors_max_difference: float | None


@dataclass
class Report:
    tag: str
    tools: Tools | None = None
    base: Base | None = None
    build: Build | None = None
    image: Image | None = None
    traces: Traces | None = None
    user: User | None = None
    handler: Handler | None = None
    servers: Servers | None = None
    error: str | None = None  # the step that failed, and why
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def find_failures(self) -> list[str]:
        """What the checks found wrong; the error alone where a step failed."""
        if self.error is not None:
            return [self.error]
        assert self.traces and self.user and self.handler and self.servers
        found = []
        traces = self.traces
        if traces.in_config or traces.mount_leftovers or traces.files_with_secrets:
            found.append(f"build traces left in the image: {asdict(traces)}")
        if not (traces.searched and traces.control_found):
            found.append("the file search for traces did not run or missed its control")
        who = self.user
        if who.uid == 0 or not (who.hf_cache_writable and who.infinity_home_writable):
            found.append(f"the image's user: {asdict(who)}")
        handler = self.handler
        if handler.rc != 0 or not handler.completed or '"embedding"' not in handler.answer:
            found.append(f"python handler.py did not answer test_input.json: {handler.output_tail}")
        servers = self.servers
        for side, run in (("host", servers.host), ("container", servers.container)):
            if run.embeddings.status != 200:
                found.append(f"{side}: /v1/embeddings answered {asdict(run.embeddings)}")
        if not servers.vectors_equal:
            found.append(
                f"container vectors differ from the host's: {servers.vectors_max_difference}"
            )
        for case in servers.container.cases:
            answer = case.answer if isinstance(case.answer, dict) else {}
            if case.http_status != 200 or answer.get("status") != "COMPLETED":
                found.append(f"tests.json case {case.name}: {case.http_status} {str(answer)[:500]}")
        return found

    def to_json(self) -> str:
        data = {key: value for key, value in asdict(self).items() if value is not None}
        return json.dumps(data, indent=1) + "\n"

    def summary(self) -> str:
        lines = [f"report: {self.tag} in {self.seconds} s"]
        if self.build is not None and self.base is not None:
            lines.append(
                f"base: {self.base.source}; build {self.build.seconds} s "
                f"({self.build.steps_cached} steps cached)"
            )
        if self.image is not None:
            size, count = self.image.layers_bytes / 1e9, len(self.image.layers)
            lines.append(f"image: {size:.2f} GB in {count} layers")
        if self.servers is not None:
            inside, host = self.servers.container, self.servers.host
            lines.append(
                f"start to first answer: container {inside.first_answer_s} s, "
                f"host {host.first_answer_s} s; vectors equal: {self.servers.vectors_equal}"
            )
        return "\n".join(lines)
