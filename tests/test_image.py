"""The worker's CPU image, built from the Dockerfile and run for real by builder/image/: buildah,
a debootstrapped Debian base, the image's CMD as RunPod's local test and as a load-balancing
endpoint answering .runpod/tests.json's jobs, its vectors against the host's.

It needs root and apt-get (to install buildah and debootstrap when absent) and skips, saying so,
only where neither is to be had. On this project's machines it takes 3 to 5 minutes on a fresh
machine, about 1 once the base and buildah's layer cache are there (README, docs/deployment.md).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import builder.image
from tests.conftest import ROOT
from tests.test_deploy import TESTS, check_hub_answer

SKIP = 77  # python -m builder.image: buildah cannot be installed here


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("image") / "image.json"
    proc = subprocess.run(
        [sys.executable, "-m", "builder.image", "--report", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode == SKIP:
        pytest.skip(f"no image build here: {proc.stderr.strip()}")
    assert path.exists(), (proc.stdout + proc.stderr)[-5000:]
    data: dict[str, Any] = json.loads(path.read_text())
    data["exit_status"] = proc.returncode
    return data


def test_the_image_builds_and_every_check_of_the_script_passes(report):
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["exit_status"] == 0
    assert report["build"]["local_wheels"] or report["build"]["torch_index"].endswith("/cpu")


def test_the_image_runs_the_handler_as_an_unprivileged_user_with_writable_caches(report):
    image, who = report["image"], report["user"]
    assert image["cmd"] == ["python", "-u", "handler.py"]
    assert image["user"] and image["user"].split(":")[0] != "0"
    assert who["uid"] == int(image["user"].split(":")[0]) != 0
    assert who["hf_cache"].startswith(who["home"]) and who["hf_cache_writable"]
    assert who["infinity_home_writable"] and who["tmp_writable"]
    assert not who["app_writable"]  # the code stays as built
    assert who["models_dir"] == "/models"


def test_no_secret_host_path_or_mount_is_left_in_the_image(report):
    traces = report["traces"]
    assert traces["searched"] and traces["control_found"]  # the file search finds what is there
    assert traces["in_config"] == []
    assert traces["mount_leftovers"] == []
    assert traces["files_with_secrets"] == []
    env = dict(entry.split("=", 1) for entry in report["image"]["env"])
    assert not {"PIP_CERT", "PIP_FIND_LINKS", "PIP_CONFIG_FILE", "HF_TOKEN"} & set(env)
    history = " ".join(report["image"]["history"])
    assert "/etc/xdg/pip" not in history and "hf_canary" not in history


def test_python_handler_py_in_the_image_answers_test_input_json(report):
    handler = report["handler"]
    assert handler["rc"] == 0 and handler["completed"], handler["output_tail"]
    texts = json.loads((ROOT / "test_input.json").read_text())["input"]["input"]
    assert handler["answer"].count('"object": "embedding"') == len(texts)
    assert '"model": "sentence-transformers/all-MiniLM-L6-v2"' in handler["answer"]


def decode(answer: dict[str, Any]) -> np.ndarray:
    body = answer["body"]
    return np.stack(
        [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in body["data"]]
    )


def test_the_server_in_the_image_answers_ping_then_vectors_equal_to_the_hosts(report):
    servers = report["servers"]
    inside, host = servers["container"], servers["host"]
    assert inside["pings"][-1] == 200 and set(inside["pings"]) <= {204, 200}
    assert 0 < inside["ready_s"] <= inside["first_answer_s"]
    assert inside["embeddings"]["status"] == host["embeddings"]["status"] == 200
    ours, theirs = decode(inside["embeddings"]), decode(host["embeddings"])
    assert ours.shape == (len(servers["embed_request"]["input"]), 384)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-3)
    assert np.array_equal(ours, theirs)
    assert float(ours[0] @ ours[1]) < 0.9  # two different texts: two different vectors


def test_every_hub_test_job_gets_a_real_answer_from_the_image(report):
    servers = report["servers"]
    config = {pair["key"]: pair["value"] for pair in TESTS["config"]["env"]}
    assert servers["config"] == config  # the Hub's own configuration, not a local one
    served = set(config["MODEL_NAMES"].split(";"))
    answers = {case["name"]: case for case in servers["container"]["cases"]}
    assert set(answers) == {test["name"] for test in TESTS["tests"]}
    models_job = next(
        t["name"] for t in TESTS["tests"] if t["input"].get("openai_route") == "/v1/models"
    )
    models = answers[models_job]["answer"]["output"][0]["data"]
    dims = {m["id"]: m.get("dimensions") for m in models}
    for test in TESTS["tests"]:
        answer = answers[test["name"]]
        assert answer["http_status"] == 200, answer
        assert answer["answer"]["status"] == "COMPLETED", answer
        check_hub_answer(test["input"], answer["answer"]["output"], dims, served)


def test_the_report_holds_the_size_and_the_start_times(report):
    image = report["image"]
    assert len(image["layers"]) >= 5 and all(layer["bytes"] > 0 for layer in image["layers"])
    assert image["layers_bytes"] == sum(layer["bytes"] for layer in image["layers"])
    # The layers hold every file of the image once at least (more where a later layer replaces
    # one): their sum cannot be below the unpacked files.
    assert image["layers_bytes"] >= report["traces"]["rootfs_bytes"]
    servers = report["servers"]
    assert servers["container"]["first_answer_s"] > 0 and servers["host"]["first_answer_s"] > 0


@pytest.mark.parametrize(
    "euid,absent,reason",
    [
        (1000, [], "needs root"),
        (1000, ["buildah"], "not root"),
        (0, ["debootstrap", "apt-get"], "no apt-get"),
    ],
)
def test_the_script_skips_only_where_buildah_cannot_be_had_and_says_why(
    euid, absent, reason, monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda t: None if t in absent else real_which(t))
    args = ["--report", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path)]
    assert builder.image.main(args) == SKIP == builder.image.SKIP
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()  # nothing was built or reported


def test_a_report_holds_the_steps_that_ran_and_reads_back_as_written():
    from builder.image.report import Base, Image, Layer, Report

    failed = Report(tag="t", base=Base(tag="b", source="debootstrap", seconds=1.0), error="boom")
    failed.failures = failed.find_failures()
    data = json.loads(failed.to_json())
    assert list(data) == ["tag", "base", "error", "seconds", "failures"]  # no step that did not run
    assert data["failures"] == ["boom"] and data["base"]["source"] == "debootstrap"
    image = Image(
        tag="t",
        id="i",
        user="1000:1000",
        cmd=["python", "-u", "handler.py"],
        workdir="/app",
        env=["PATH=/usr/bin", "MODELS_DIR=/baked"],
        history=["RUN x"],
        layers=[Layer(bytes=3, step="RUN x")],
        layers_bytes=3,
    )
    written = json.loads(Report(tag="t", image=image).to_json())["image"]
    assert Image.from_json(written) == image and image.models_dir == "/baked"
