"""A real package: pinned dependencies that agree with the lock files, the console script, one
version written once, no sys.path patches anywhere, a license."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import embedding_worker
from builder import onnx_lock
from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(path) -> set[str]:
    """The requirement lines of a requirements file (no comments, no -r includes)."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {line for line in lines if line and not line.startswith("-")}


def test_runtime_dependencies_are_the_lock_the_dockerfile_installs():
    declared = set(PYPROJECT["project"]["dependencies"])
    assert declared == pins(ROOT / "builder" / "requirements.txt")


def test_the_dev_extra_is_the_dev_lock():
    declared = set(PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert declared == pins(ROOT / "builder" / "requirements-dev.txt")


@pytest.mark.parametrize("extra", ["onnx", "ctranslate2"])
def test_each_backend_extra_is_its_lock_and_ci_installs_it(extra):
    declared = set(PYPROJECT["project"]["optional-dependencies"][extra])
    lock = f"requirements-{extra}.txt"
    assert declared == pins(ROOT / "builder" / lock)
    assert f"-r {lock}" in (ROOT / "builder" / "requirements-dev.txt").read_text()
    for requirement in declared:  # installed here, as CI installs it
        name = requirement.split("==")[0]
        assert metadata.version(name) == requirement.split("==")[1]


def test_the_gpu_onnx_extra_differs_from_the_onnx_extra_only_in_onnx_runtimes_build():
    extras = PYPROJECT["project"]["optional-dependencies"]
    gpu, cpu = set(extras["onnx-gpu"]), set(extras["onnx"])
    assert gpu == pins(ROOT / "builder" / "requirements-onnx-gpu.txt")
    (gpu_runtime,) = {r for r in gpu if r.startswith("onnxruntime-gpu==")}
    (cpu_runtime,) = {r for r in cpu if r.startswith("onnxruntime==")}
    assert gpu - {gpu_runtime} == cpu - {cpu_runtime}


def test_the_gpu_ctranslate2_extra_adds_cuda_12s_cublas_to_the_ctranslate2_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    gpu = set(extras["ctranslate2-gpu"])
    assert gpu == pins(ROOT / "builder" / "requirements-ctranslate2-gpu.txt")
    (cublas,) = gpu - set(extras["ctranslate2"])
    assert cublas.startswith("nvidia-cublas-cu12==")


def test_the_image_installs_the_onnx_runtime_build_that_matches_torchs():
    # builder/onnx_lock.py, as the Dockerfile runs it: this machine's torch is a CPU build
    proc = subprocess.run(
        [sys.executable, "builder/onnx_lock.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == onnx_lock.CPU_LOCK
    assert onnx_lock.onnx_lock("13.0") == onnx_lock.GPU_LOCK
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'pip install -r "$(python builder/onnx_lock.py)"' in dockerfile
    for lock in (onnx_lock.CPU_LOCK, onnx_lock.GPU_LOCK):
        assert (ROOT / lock).is_file() and Path(lock).name in dockerfile


def test_every_dependency_is_pinned():
    project = PYPROJECT["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    for requirement in [*project["dependencies"], *extras]:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[\w.]+", requirement), requirement


def test_the_console_script_is_installed():
    (script,) = [
        e for e in metadata.entry_points(group="console_scripts") if e.name == "embedding-worker"
    ]
    assert (
        script.value
        == "embedding_worker.cli:main"
        == PYPROJECT["project"]["scripts"]["embedding-worker"]
    )


def test_the_package_version_is_the_modules_own():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "embedding_worker.__version__"}
    # What the installed package says (`pip install -e .` built its metadata from the attribute).
    assert metadata.version("embedding-worker") == embedding_worker.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", embedding_worker.__version__)


def test_the_version_is_written_once():
    version = embedding_worker.__version__
    files = [ROOT / "pyproject.toml", ROOT / "Dockerfile", ROOT / "handler.py"]
    files += [*ROOT.glob("src/**/*.py"), *ROOT.glob("builder/**/*.py"), *ROOT.glob("builder/*.txt")]
    files += [*ROOT.glob(".runpod/*.json")]
    copies = [
        str(path.relative_to(ROOT))
        for path in files
        if path.is_file() and re.search(rf"[\"']v?{re.escape(version)}[\"']", path.read_text())
    ]
    assert copies == ["src/embedding_worker/__init__.py"]


def test_no_sys_path_patches_anywhere():
    patch = re.compile(r"sys\.path\s*(\[|\.insert|\.append|\.extend|=|\+=)")
    sources = [ROOT / "handler.py", *ROOT.glob(f"{'src'}/**/*.py")]
    sources += [*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("builder/**/*.py")]
    patched = [str(p.relative_to(ROOT)) for p in sources if patch.search(p.read_text())]
    assert not patched


def test_a_license_is_there():
    text = (ROOT / "LICENSE").read_text()
    assert "MIT License" in text or "Apache License" in text
