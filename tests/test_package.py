"""The package's face: importing it changes nothing outside it; memory settings
are an explicit call (`pes_calc.reuse_freed_memory`)."""

import os
import subprocess
import sys
import threading

import pytest
import torch

# the dependencies first: what they change at import (torch's inductor sets its
# cache directory) is theirs; after them, importing pes_calc must change nothing
UNCHANGED = """
import os, torch, ase, e3nn.o3, spex, vesin, safetensors, click
before = dict(os.environ), torch.get_default_dtype(), torch.get_num_threads()
import pes_calc, pes_calc.cli, pes_calc.compile, pes_calc.train, pes_calc.active
after = dict(os.environ), torch.get_default_dtype(), torch.get_num_threads()
print(before == after, sorted(set(after[0].items()) ^ set(before[0].items())))
"""


def _run(script: str, **env_changes: str | None) -> str:
    env = dict(os.environ)
    for name, value in env_changes.items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_importing_pes_calc_changes_no_environment_dtype_or_threads():
    assert _run(UNCHANGED, THP_MEM_ALLOC_ENABLE=None) == "True []"


FAULTS = """
import resource, sys, pes_calc
if sys.argv[1] == "reuse":
    print(pes_calc.reuse_freed_memory(), end=" ")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(200_000_000)  # malloc'd and written: 48 828 fresh 4 KiB pages
del block
before = faults()
block = bytearray(200_000_000)
print(faults() - before)
"""


def _faults_of_a_second_large_block(call: str, opt_out: str | None = None) -> str:
    script = FAULTS.replace("sys.argv[1]", repr(call))
    return _run(script, PES_CALC_REUSE_FREED_MEMORY=opt_out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_only_when_asked():
    imported_only = int(_faults_of_a_second_large_block("import"))
    if imported_only < 10_000:  # e.g. transparent huge pages for every allocation
        pytest.skip(f"fresh pages are cheap here already ({imported_only} faults)")
    applied, reused = _faults_of_a_second_large_block("reuse").split()
    assert applied == "True" and int(reused) < imported_only / 20
    applied, faults = _faults_of_a_second_large_block("reuse", opt_out="0").split()
    assert applied == "False" and int(faults) > imported_only / 2


THP = """
import os, pes_calc
pes_calc.reuse_freed_memory()
print(os.environ.get("THP_MEM_ALLOC_ENABLE"))
"""


@pytest.mark.parametrize("given, expected", [(None, "1"), ("0", "0")])
def test_huge_pages_come_with_the_call_unless_the_user_said_otherwise(given, expected):
    assert _run(THP, THP_MEM_ALLOC_ENABLE=given) == expected


def test_building_a_float64_model_leaves_the_default_dtype_and_other_threads():
    """float64 construction is scoped to the building thread: a thread creating
    tensors meanwhile still gets torch's default dtype."""
    from pes_calc import build_model

    seen: list[torch.dtype] = []
    stop = threading.Event()

    def make_tensors() -> None:
        while not stop.is_set():
            seen.append(torch.zeros(1).dtype)

    thread = threading.Thread(target=make_tensors)
    thread.start()
    try:
        model = build_model(
            "nequip",
            ["Cu"],
            num_layers=1,
            l_max=1,
            num_features=4,
            model_dtype="float32",
            seed=0,
        )
    finally:
        stop.set()
        thread.join()
    assert torch.get_default_dtype() == torch.float32
    assert seen and set(seen) == {torch.float32}
    assert next(model.parameters()).dtype == torch.float32
