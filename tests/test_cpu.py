"""The CPU's flags and name, read once from /proc/cpuinfo for every caller."""

from __future__ import annotations

import platform

from embedding_worker.cpu import cpu_flags, processor_name

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512_bf16 amx_bf16
bugs\t\t: spectre_v1

processor\t: 1
model name\t: another name, never read
flags\t\t: fpu
"""


def test_the_first_processors_flags_and_name_are_read(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert cpu_flags(path) == {"fpu", "sse2", "avx2", "avx512_bf16", "amx_bf16"}
    assert processor_name(path) == "Intel(R) Xeon(R) Platinum 8480+"


def test_without_a_readable_file_the_flags_are_empty_and_the_name_is_platforms(tmp_path):
    missing = tmp_path / "absent"
    assert cpu_flags(missing) == frozenset()
    assert processor_name(missing) == (platform.processor() or platform.machine())
    nameless = tmp_path / "cpuinfo"
    nameless.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # an ARM machine's
    assert cpu_flags(nameless) == frozenset()
    assert processor_name(nameless) == (platform.processor() or platform.machine())
