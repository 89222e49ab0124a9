"""Every ``kernels/cuda/*.cu`` file compiles with nvcc, so a syntax error fails CI without a GPU.

CuPy compiles the same sources with NVRTC at run time; nvcc here targets sm_90 (H100) and emits a
cubin, which also runs ptxas.  Skipped when nvcc is not on PATH.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from lowbit.kernels._cuda import SOURCE_DIR

NVCC = shutil.which("nvcc")
SOURCES = sorted(pathlib.Path(SOURCE_DIR).glob("*.cu"))

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def test_there_are_cuda_sources():
    assert {path.name for path in SOURCES} >= {"pack.cu", "xnor_gemm.cu", "threshold.cu", "binary_conv.cu"}


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_cuda_source_compiles(source, tmp_path):
    cubin = tmp_path / "kernel.cubin"
    result = subprocess.run(
        [NVCC, "-cubin", "-arch=sm_90", "-Werror", "all-warnings", "-o", str(cubin), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
