from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from enn_neuro.runtime import MALLOC_ENV

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# twelve steps of a small 3D convolution (28 MiB input, 56 MiB output); prints the page
# faults of each step
_FAULTS_PER_STEP = """
import json, resource, torch
import torch.nn.functional as F
from enn_neuro.runtime import retain_freed_memory
tuned = retain_freed_memory()
weight = torch.randn(8, 4, 3, 3, 3, requires_grad=True)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    volume = torch.randn(2, 4, 96, 96, 96)
    F.conv3d(volume, weight, padding=1).square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _steps(**env) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_STEP],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(completed.stdout)


@pytest.mark.skipif(not GLIBC, reason="the allocator is tuned under glibc only")
def test_freed_memory_is_reused_without_page_faults():
    # glibc maps and unmaps blocks this large on every step (a fault per 4 KiB page touched),
    # unless tuned; tuned, the heap grows over the first steps (now and then a later one, as
    # freed blocks fragment) and is then reused
    untuned = _steps(**{MALLOC_ENV: "system"})
    tuned = _steps(**{MALLOC_ENV: ""})
    assert untuned["tuned"] is False and tuned["tuned"] is True
    assert min(untuned["faults"][6:]) > 10_000
    assert sum(tuned["faults"][6:]) < 0.05 * sum(untuned["faults"][6:])


def test_system_setting_leaves_the_allocator_alone(monkeypatch):
    from enn_neuro.runtime import retain_freed_memory

    monkeypatch.setenv(MALLOC_ENV, "system")
    assert retain_freed_memory() is False
