"""Import-time settings of the package (pes_calc/__init__.py)."""

import os
import subprocess
import sys

import pytest

SCRIPT = "import os, pes_calc; print(os.environ['THP_MEM_ALLOC_ENABLE'])"


@pytest.mark.parametrize("given, expected", [(None, "1"), ("0", "0")])
def test_huge_page_allocation_is_on_unless_the_user_said_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == expected


FAULTS = """
import resource, pes_calc
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(200_000_000)  # malloc'd and written: 48 828 fresh 4 KiB pages
del block
before = faults()
block = bytearray(200_000_000)
print(faults() - before)
"""


def _page_faults_of_a_second_large_block(reuse: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "PES_CALC_REUSE_FREED_MEMORY"}
    if reuse is not None:
        env["PES_CALC_REUSE_FREED_MEMORY"] = reuse
    result = subprocess.run(
        [sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True
    )
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_unless_the_user_said_otherwise():
    reused = _page_faults_of_a_second_large_block(None)
    returned = _page_faults_of_a_second_large_block("0")
    if returned < 10_000:  # e.g. transparent huge pages for every allocation
        pytest.skip(f"fresh pages are cheap here already ({returned} faults)")
    assert reused < returned / 20
