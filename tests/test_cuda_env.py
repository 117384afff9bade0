"""CUDA_DEVICE_MAX_CONNECTIONS: the entry points set it before torch is imported, and keep a value the user set."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

# records the variable as the first `import torch` begins: what CUDA will find when it makes the context
PROBE = """
import os, sys
seen = []
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))
sys.meta_path.insert(0, Probe())
import {module}
print(seen[0], os.environ["CUDA_DEVICE_MAX_CONNECTIONS"])
"""


@pytest.mark.parametrize("module", ["train", "benchmarks.throughput"])
@pytest.mark.parametrize("given, expected", [(None, "32"), ("4", "4")])
def test_the_entry_points_set_cuda_connections_before_torch_unless_the_user_did(module, given, expected):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    if given is not None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = given
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [expected, expected]
