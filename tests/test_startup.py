"""Start-up costs the worker adds over the engine (bench/run.py measures the cold start itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import json, sys, time
import cpuinfo, cpuinfo.cpuinfo
from embedding_worker.cpu import processor_name
from embedding_worker.transports import runpod as runpod_transport
probes = []
real = cpuinfo.cpuinfo.get_cpu_info_json  # what starts py-cpuinfo's subprocess
cpuinfo.cpuinfo.get_cpu_info_json = lambda: probes.append(1) or real()
runpod = runpod_transport.import_runpod()
from runpod.serverless.utils import rp_debugger
print(json.dumps({"processor": rp_debugger.PROCESSOR, "expected": processor_name(),
                  "full_probes": len(probes), "restored": cpuinfo.get_cpu_info.__module__,
                  "start": callable(runpod.serverless.start)}))
"""


def test_runpod_imports_without_the_cpu_probe_subprocess_and_keeps_its_processor_name():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["full_probes"] == 0  # py-cpuinfo's subprocess probe never ran
    assert got["processor"] == got["expected"] and got["processor"]
    assert got["restored"] == "cpuinfo.cpuinfo"  # the real function is back for anyone else
    assert got["start"]


def test_uvicorns_own_lines_are_not_labelled_as_errors():
    import logging

    from embedding_worker.startup import configure_logging

    configure_logging()
    (handler,) = logging.getLogger().handlers
    lines = []
    for name in ("uvicorn.error", "embedding_worker"):
        record = logging.LogRecord(name, logging.INFO, __file__, 1, "Started", None, None)
        assert handler.filter(record)
        lines.append(handler.format(record))
    assert lines[0].endswith("INFO uvicorn: Started")
    assert lines[1].endswith("INFO embedding_worker: Started")


def test_the_torch_dtype_notice_of_infinitys_loader_is_not_shown(caplog):
    import logging

    from embedding_worker.engines.infinity import quiet_infinity

    quiet_infinity({})
    for name in ("transformers.configuration_utils", "transformers.modeling_utils"):
        logging.getLogger(name).warning("`torch_dtype` is deprecated! Use `dtype` instead!")
        logging.getLogger(name).warning("another warning")
    shown = [r.getMessage() for r in caplog.records]
    assert shown == ["another warning", "another warning"]


FREEZE_PROBE = """
import gc, json, sys
from embedding_worker.config import load_config
from embedding_worker.startup import build_worker
before = gc.get_freeze_count()
build_worker(load_config({"MODEL_NAMES": sys.argv[1], "DTYPES": "float32"}))
print(json.dumps({"before": before, "frozen": gc.get_freeze_count(),
                  "tracked": len(gc.get_objects())}))
"""


def test_what_the_worker_loads_is_kept_out_of_the_garbage_collectors_way(bert_embedder):
    """A full collection walks every tracked object holding the GIL; what the libraries and the
    models left behind is frozen once loaded, so requests (and /health) never wait out such a
    walk."""
    probe = subprocess.run(
        [sys.executable, "-c", FREEZE_PROBE, str(bert_embedder)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    counts = json.loads(probe.stdout.strip().splitlines()[-1])
    assert counts["before"] == 0
    assert counts["frozen"] > 100_000  # the libraries and the model, not a handful
    assert counts["tracked"] < counts["frozen"] / 10  # what a collection still walks
