"""``allocator``: with glibc, a large freed tensor's memory is kept for the next one, and given back when asked;
glibc's default gives it back at once. Each case runs in its own process, as malloc's settings hold for one."""

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's malloc's")

RESIDENT_MB_AFTER_EACH_STEP = """
import json, os, sys
import torch
from TextDiffSegLib.allocator import keep_freed_memory, release_freed_memory

def resident_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

kept = keep_freed_memory() if sys.argv[1] == "keep" else False
before = resident_mb()
tensor = torch.ones(2**26)  # 256 MB
holding = resident_mb()
del tensor
freed = resident_mb()
released = release_freed_memory()
print(json.dumps({"kept": kept, "holding": holding - before, "freed": freed - before,
                  "released": released, "after_release": resident_mb() - before}))
"""


def resident_mb_after_each_step(setting: str) -> dict:
    run = subprocess.run([sys.executable, "-c", RESIDENT_MB_AFTER_EACH_STEP, setting], capture_output=True, text=True,
                         check=True)
    return json.loads(run.stdout)


def test_freed_memory_is_kept_until_released():
    steps = resident_mb_after_each_step("keep")
    assert steps["kept"] and steps["holding"] > 200
    assert steps["freed"] > 200  # kept for the next tensor
    assert steps["released"] and steps["after_release"] < 50


def test_glibcs_default_returns_a_large_freed_tensor_at_once():
    steps = resident_mb_after_each_step("default")
    assert not steps["kept"] and steps["holding"] > 200
    assert steps["freed"] < 50
