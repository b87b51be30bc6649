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
