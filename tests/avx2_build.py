"""Run a check script with the kernels compiled for AVX2 (a Haswell target: 8-lane float and 4-lane
uint64 vectors, 16 registers), in a subprocess with its own Numba cache.  The machines that run the
suite have AVX-512, so without this the AVX2 builds of the kernels would go untested."""
from __future__ import annotations

import os
import subprocess
import sys

HASWELL_FEATURES = "+avx,+avx2,+fma,+popcnt,+sse4.2,+bmi,+bmi2,+f16c,+lzcnt,+movbe"


def run_avx2_check(script, cache_dir):
    """Run ``script`` (Python source that prints ``ok`` when its checks pass) under the AVX2 build;
    fails the calling test with the script's stderr otherwise."""
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(cache_dir),
               NUMBA_CPU_FEATURES=HASWELL_FEATURES)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
