"""Build the worker's CPU image with buildah and check it from the inside, as RunPod runs it.

    python builder/image.py [--report FILE] [--tag TAG] [--cache-dir DIR]

Run it as root with the repository's virtual environment (the host side of the comparison runs the
same worker from it). In order, it:

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
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path("/var/cache/embedding-worker-image")
DEFAULT_REPORT = ROOT / "bench" / "results" / "image.json"
DEFAULT_TAG = "localhost/embedding-worker:cpu"
BASE_TAG = "localhost/embedding-worker-base:bookworm"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-*.whl"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"
# Folders every Debian base has, empty: a read-only mount on one leaves nothing in a layer (a mount
# point buildah has to create stays in the layer as an empty file or folder). pip reads its
# site-wide settings from /etc/xdg/pip/pip.conf; the local base carries that folder empty.
PIP_CONF_MOUNT = "/etc/xdg/pip"
WHEELS_MOUNT = "/mnt"
SKIP = 77  # the exit status that tells the test buildah cannot be had here
START_TIMEOUT = 300.0
ISOLATION = ["--isolation", "chroot"]


class CheckFailed(RuntimeError):
    """A step of the build or a check of the image failed; the message says which."""


class ToolsMissing(RuntimeError):
    """buildah or debootstrap is absent and cannot be installed here."""


def log(message: str) -> None:
    print(f"[image] {message}", flush=True)


def run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, its output captured; a failure raises with the command and its output."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise CheckFailed(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")
    return proc


# --- 1. tools ---------------------------------------------------------------------------------


def ensure_tools() -> dict[str, Any]:
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    started = time.monotonic()
    if missing:
        if os.geteuid() != 0:
            raise ToolsMissing(f"{', '.join(missing)} absent and not root: cannot apt-get install")
        if shutil.which("apt-get") is None:
            raise ToolsMissing(f"{', '.join(missing)} absent and no apt-get to install them")
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", *missing], env=env)
    elif os.geteuid() != 0:
        raise ToolsMissing("buildah's chroot isolation with overlay storage needs root here")
    version = run(["buildah", "--version"]).stdout.strip()
    return {
        "installed": missing,
        "seconds": round(time.monotonic() - started, 1),
        "buildah": version,
    }


# --- 2. the local base --------------------------------------------------------------------------


def image_exists(tag: str) -> bool:
    return (
        subprocess.run(
            ["buildah", "inspect", "--type", "image", tag], capture_output=True
        ).returncode
        == 0
    )


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


def ensure_base(cache_dir: Path) -> dict[str, Any]:
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
    return {"tag": BASE_TAG, "source": source, "seconds": round(time.monotonic() - started, 1)}


# --- 3. the build -------------------------------------------------------------------------------


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


def build(
    tag: str, base: str, model_names: str, canary: str, work: Path, log_file: Path
) -> dict[str, Any]:
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
    return {
        "seconds": round(seconds, 1),
        "steps_cached": text.count("Using cache"),
        "torch_index": torch_index,
        "local_wheels": wheels is not None,
        "host_ca": cert is not None,
        "mounts": [m for m in mounts if m != "-v"],
        "log": str(log_file),
    }


# --- 4. what the image holds --------------------------------------------------------------------


def inspect(tag: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(run(["buildah", "inspect", "--type", "image", tag]).stdout)
    return data


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


def describe(tag: str) -> dict[str, Any]:
    data = inspect(tag)
    config = data["Docker"]["config"]
    history = data["Docker"].get("history", [])
    sizes = layer_sizes(data["FromImageID"])
    steps = [h.get("created_by", "") for h in history if not h.get("empty_layer")]
    if len(steps) != len(sizes):  # the history does not line up: keep the sizes alone
        steps = [""] * len(sizes)
    return {
        "tag": tag,
        "id": data["FromImageID"],
        "user": config.get("User"),
        "cmd": config.get("Cmd"),
        "workdir": config.get("WorkingDir"),
        "env": config.get("Env", []),
        "history": [h.get("created_by", "") for h in history],
        "layers": [{"bytes": size, "step": step} for size, step in zip(sizes, steps)],
        "layers_bytes": sum(sizes),
    }


@contextmanager
def container(tag: str) -> Iterator[str]:
    name = f"embedding-worker-check-{os.getpid()}-{secrets.token_hex(3)}"
    run(["buildah", "from", "--pull=false", "--name", name, tag])
    try:
        yield name
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True)


def pem_blocks(text: str) -> set[str]:
    blocks = text.split("-----BEGIN CERTIFICATE-----")[1:]
    return {b.split("-----END CERTIFICATE-----")[0].strip() for b in blocks}


def check_traces(
    image: dict[str, Any], ctr: str, canary: str, host_paths: list[str]
) -> dict[str, Any]:
    """Nothing of the build's mounts and secret is left: not in the configuration, not in a file."""
    config_text = json.dumps(inspect(image["tag"])["Docker"])  # config and history, as pushed
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
    return {
        "in_config": needles_in_config,
        "mount_leftovers": leftovers,
        "host_only_certs": len(host_only),
        "files_with_secrets": files_with_needles,
        "rootfs_bytes": int(du),
        "searched": grep.returncode in (0, 1),
        "control_found": control_found,
    }


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


# --- 5. running the image -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(method: str, url: str, body: Any = None, timeout: float = 120.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def run_handler(ctr: str, cmd: list[str]) -> dict[str, Any]:
    """The image's CMD as RunPod's local test: it answers test_input.json and exits."""
    started = time.monotonic()
    proc = subprocess.run(
        ["buildah", "run", *ISOLATION, ctr, "--", *cmd],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    output = proc.stdout + proc.stderr
    answer = next((line for line in output.splitlines() if "Job result:" in line), "")
    return {
        "rc": proc.returncode,
        "seconds": round(time.monotonic() - started, 2),
        "completed": "Job local_test completed successfully" in output,
        "answer": answer.split("Job result:", 1)[-1].strip(),
        "output_tail": output[-2000:],
    }


EMBED_REQUEST = {
    "input": ["A kitten sleeps on the sofa.", "The stock market fell today."],
    "encoding_format": "base64",
}


def serve_and_ask(
    argv: list[str], env: dict[str, str], port: int, model: str, cases: list[dict[str, Any]]
) -> dict[str, Any]:
    """Start a worker in load-balancing mode, time it to its first answer, then send the cases."""
    url = f"http://127.0.0.1:{port}"
    output = tempfile.TemporaryFile()  # a pipe nobody reads would stall a talkative worker
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
    )
    result: dict[str, Any] = {"pings": []}
    try:
        while True:
            if proc.poll() is not None:
                raise CheckFailed(f"the worker exited {proc.returncode} before it was ready")
            if time.monotonic() - started > START_TIMEOUT:
                raise CheckFailed(f"no /ping 200 after {START_TIMEOUT:.0f} s")
            try:
                status, _ = http("GET", f"{url}/ping", timeout=5)
            except OSError:
                status = None
            if status is not None and (not result["pings"] or result["pings"][-1] != status):
                result["pings"].append(status)
                result.setdefault("first_ping_s", round(time.monotonic() - started, 3))
            if status == 200:
                result["ready_s"] = round(time.monotonic() - started, 3)
                break
            if status not in (None, 204):
                raise CheckFailed(f"/ping answered {status} while loading")
            time.sleep(0.05)
        status, body = http("POST", f"{url}/v1/embeddings", {"model": model, **EMBED_REQUEST})
        result["first_answer_s"] = round(time.monotonic() - started, 3)
        result["embeddings"] = {"status": status, "body": body}
        result["cases"] = []
        for case in cases:
            status, body = http(
                "POST", f"{url}/runsync", {"input": case["input"]}, timeout=case["timeout"] / 1000
            )
            result["cases"].append({"name": case["name"], "http_status": status, "answer": body})
    except CheckFailed as exc:
        stop(proc)
        raise CheckFailed(f"{exc}; {argv[0]} said:\n{tail(output)}") from None
    finally:
        stop(proc)
        result["output_tail"] = tail(output)
        output.close()
    return result


def tail(output: IO[bytes]) -> str:
    output.seek(0)
    return output.read().decode(errors="replace")[-3000:]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """The process group this script started (buildah run and the worker under it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def hub_environment() -> tuple[dict[str, str], list[dict[str, Any]]]:
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())
    return {pair["key"]: pair["value"] for pair in tests["config"].get("env", [])}, tests["tests"]


def stand_ins(names: list[str], work: Path) -> dict[str, Path]:
    """A local model for each hub id that is neither bundled nor downloadable here: a tiny random
    cross-encoder from the test suite's factory (the Hub's tests name a reranker)."""
    from embedding_worker.config import DEFAULT_MODEL_ID

    spec = importlib.util.spec_from_file_location(
        "model_factory", ROOT / "tests" / "model_factory.py"
    )
    assert spec is not None and spec.loader is not None
    model_factory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_factory)

    made = {}
    for name in names:
        if name != DEFAULT_MODEL_ID:
            made[name] = model_factory.make_bert_cross_encoder(work / "stand-ins" / name)
            # safetensors writes its file 0600: the image's user (not root) must read it, as it
            # must read any model mounted into the container.
            run(["chmod", "-R", "a+rX", str(made[name])])
    return made


def b64_vectors(answer: dict[str, Any]) -> list[str]:
    body = answer.get("body") or {}
    return [item["embedding"] for item in body.get("data", [])] if isinstance(body, dict) else []


def max_difference(a: list[str], b: list[str]) -> float | None:
    if len(a) != len(b) or not a:
        return None
    import struct

    worst = 0.0
    for x, y in zip(a, b):
        u, v = base64.b64decode(x), base64.b64decode(y)
        if len(u) != len(v):
            return None
        fu = struct.unpack(f"<{len(u) // 4}f", u)
        fv = struct.unpack(f"<{len(v) // 4}f", v)
        worst = max(worst, max(abs(p - q) for p, q in zip(fu, fv)))
    return worst


LOAD_BALANCER = {"RUNPOD_LOAD_BALANCER": "true", "LOG_LEVEL": "INFO"}


def start_on_host(
    env: dict[str, str], local: dict[str, Path], work: Path, model: str, cases: list[dict[str, Any]]
) -> dict[str, Any]:
    """The same worker from the virtual environment, the stand-ins in its MODELS_DIR."""
    host_models = work / "host-models"
    for name, path in local.items():
        if not (host_models / name).exists():
            (host_models / name).parent.mkdir(parents=True, exist_ok=True)
            (host_models / name).symlink_to(path)
    port = free_port()
    host_env = {
        **os.environ,
        **env,
        **LOAD_BALANCER,
        "PORT": str(port),
        "PORT_HEALTH": str(port),
        "MODELS_DIR": str(host_models),
        "INFINITY_HOME": str(work / "infinity"),
    }
    host_env.pop("HF_HUB_OFFLINE", None)  # the worker goes offline itself: every model is on disk
    return serve_and_ask([sys.executable, "-u", "handler.py"], host_env, port, model, cases)


def start_in_container(
    image: dict[str, Any],
    ctr: str,
    env: dict[str, str],
    local: dict[str, Path],
    model: str,
    cases: list[dict[str, Any]],
) -> dict[str, Any]:
    """The image's CMD, the stand-ins mounted where baked models are looked for."""
    port = free_port()
    models_dir = next(
        (e.split("=", 1)[1] for e in image["env"] if e.startswith("MODELS_DIR=")), "/models"
    )
    argv = ["buildah", "run", *ISOLATION]
    for key, value in {**env, **LOAD_BALANCER, "PORT": str(port), "PORT_HEALTH": str(port)}.items():
        argv += ["--env", f"{key}={value}"]
    for name, path in local.items():
        argv += ["-v", f"{path}:{models_dir}/{name}:ro"]
    return serve_and_ask([*argv, ctr, "--", *image["cmd"]], dict(os.environ), port, model, cases)


def run_servers(image: dict[str, Any], ctr: str, work: Path) -> dict[str, Any]:
    env, cases = hub_environment()
    names = env["MODEL_NAMES"].split(";")
    local = stand_ins(names, work)
    log("host: python handler.py in load-balancing mode")
    host = start_on_host(env, local, work, names[0], [])
    log("container: the image's CMD in load-balancing mode, tests.json's configuration")
    inside = start_in_container(image, ctr, env, local, names[0], cases)
    ours, theirs = b64_vectors(inside["embeddings"]), b64_vectors(host["embeddings"])
    return {
        "config": env,
        "stand_ins": sorted(local),
        "embed_request": EMBED_REQUEST,
        "host": host,
        "container": inside,
        "vectors_equal": bool(ours) and ours == theirs,
        "vectors_max_difference": max_difference(ours, theirs),
    }


# --- the whole run ------------------------------------------------------------------------------


def failures(report: dict[str, Any]) -> list[str]:
    found = []
    traces = report["traces"]
    if traces["in_config"] or traces["mount_leftovers"] or traces["files_with_secrets"]:
        found.append(f"build traces left in the image: {traces}")
    if not (traces["searched"] and traces["control_found"]):
        found.append("the file search for traces did not run or missed its control")
    who = report["user"]
    if who["uid"] == 0 or not (who["hf_cache_writable"] and who["infinity_home_writable"]):
        found.append(f"the image's user: {who}")
    handler = report["handler"]
    if handler["rc"] != 0 or not handler["completed"] or '"embedding"' not in handler["answer"]:
        found.append(f"python handler.py did not answer test_input.json: {handler['output_tail']}")
    servers = report["servers"]
    for side in ("host", "container"):
        if servers[side]["embeddings"]["status"] != 200:
            found.append(f"{side}: /v1/embeddings answered {servers[side]['embeddings']}")
    if not servers["vectors_equal"]:
        found.append(
            f"container vectors differ from the host's: {servers['vectors_max_difference']}"
        )
    for case in servers["container"]["cases"]:
        answer = case["answer"] if isinstance(case["answer"], dict) else {}
        if case["http_status"] != 200 or answer.get("status") != "COMPLETED":
            found.append(
                f"tests.json case {case['name']}: {case['http_status']} {str(answer)[:500]}"
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}"
    )
    args = parser.parse_args(argv)

    from embedding_worker.config import DEFAULT_MODEL_ID

    started = time.monotonic()
    report: dict[str, Any] = {"tag": args.tag}
    try:
        report["tools"] = ensure_tools()
    except ToolsMissing as exc:
        print(f"builder/image.py: {exc}", file=sys.stderr)
        return SKIP
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    canary = f"hf_canary_{secrets.token_hex(16)}"
    with tempfile.TemporaryDirectory(prefix="embedding-worker-image.") as tmp:
        work = Path(tmp)
        try:
            report["base"] = ensure_base(args.cache_dir)
            log_file = args.report.with_suffix(".build.log")
            report["build"] = build(args.tag, BASE_TAG, DEFAULT_MODEL_ID, canary, work, log_file)
            image = report["image"] = describe(args.tag)
            with container(args.tag) as ctr:
                mounted = [part for m in report["build"]["mounts"] for part in m.split(":")[:2]]
                host_paths = [str(work), str(args.cache_dir), *mounted]
                report["traces"] = check_traces(image, ctr, canary, host_paths)
                report["user"] = json.loads(
                    run(["buildah", "run", *ISOLATION, ctr, "--", "python", "-c", WHO]).stdout
                )
                log("container: python handler.py (RunPod's local test)")
                report["handler"] = run_handler(ctr, image["cmd"])
                report["servers"] = run_servers(image, ctr, work)
        except CheckFailed as exc:
            report["error"] = str(exc)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["failures"] = [report["error"]] if "error" in report else failures(report)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    for failure in report["failures"]:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if report["failures"] else 0


def summary(report: dict[str, Any]) -> str:
    lines = [f"report: {report.get('tag')} in {report['seconds']} s"]
    if "build" in report:
        build, base = report["build"], report["base"]["source"]
        cached = build["steps_cached"]
        lines.append(f"base: {base}; build {build['seconds']} s ({cached} steps cached)")
    if "image" in report:
        image = report["image"]
        lines.append(
            f"image: {image['layers_bytes'] / 1e9:.2f} GB in {len(image['layers'])} layers"
        )
    if "servers" in report:
        inside, host = report["servers"]["container"], report["servers"]["host"]
        lines.append(
            f"start to first answer: container {inside['first_answer_s']} s, "
            f"host {host['first_answer_s']} s; vectors equal: {report['servers']['vectors_equal']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
