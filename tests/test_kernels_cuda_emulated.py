"""The CuPy path of lowbit.kernels, run on the CPU: the ``.cu`` kernels under a thread emulator.

Machines without a GPU would otherwise never execute the CUDA kernels or the CuPy glue in
``kernels/_cuda.py``.  Here every ``kernels/cuda/*.cu`` file is compiled with g++ against a small
shim (one std::thread per CUDA thread, one block at a time, ``__syncthreads`` and
``__ballot_sync`` as barriers, ``__shared__`` as block-wide statics), and a stand-in ``cupy``
module (numpy arrays of a marked subclass, ``RawModule`` backed by the compiled library) replaces
``lowbit.backend.cupy``.  Each launch checks that every argument has the exact C type of the
kernel parameter (``long long`` gets an int64, ``float*`` a float32 array, ...).  The properties
are the ones of ``test_kernels.py``, on fixed cases (the emulator is slow).  Skipped without g++.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import types

import numpy as np
import pytest

import lowbit.backend
import lowbit.kernels as kernels
import lowbit.kernels._checks
import lowbit.kernels._cuda
import lowbit.kernels.threshold

import reference
import test_kernels
from test_kernels import check_conv, check_gemm, check_threshold

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not on PATH")

SHIM = r"""
#include <algorithm>
#include <barrier>
#include <memory>
#include <thread>
#include <vector>

struct dim3 { unsigned int x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx;
static thread_local dim3 blockIdx;
static dim3 blockDim;
static dim3 gridDim;
static std::barrier<>* emu_block_barrier = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
static unsigned int emu_votes[1024];

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(...)

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline unsigned int emu_thread_rank() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
    const unsigned int rank = emu_thread_rank();
    const unsigned int warp = rank / 32;
    const unsigned int threads = blockDim.x * blockDim.y * blockDim.z;
    emu_votes[rank] = predicate ? 1u : 0u;
    emu_warp_barriers[warp]->arrive_and_wait();
    unsigned int result = 0;
    for (unsigned int lane = 0; lane < 32 && warp * 32 + lane < threads; ++lane)
        result |= emu_votes[warp * 32 + lane] << lane;
    emu_warp_barriers[warp]->arrive_and_wait();
    return result & mask;
}
inline int atomicOr(int* address, int value) { return __atomic_fetch_or(address, value, __ATOMIC_SEQ_CST); }

template <typename Body>
static void emu_launch(dim3 grid, dim3 block, Body body) {
    gridDim = grid;
    blockDim = block;
    const unsigned int threads = block.x * block.y * block.z;
    for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
    for (unsigned int bx = 0; bx < grid.x; ++bx) {
        std::barrier<> block_barrier(threads);
        emu_block_barrier = &block_barrier;
        emu_warp_barriers.clear();
        for (unsigned int w = 0; w * 32 < threads; ++w)
            emu_warp_barriers.emplace_back(new std::barrier<>(std::min(32u, threads - 32 * w)));
        std::vector<std::thread> pool;
        for (unsigned int tz = 0; tz < block.z; ++tz)
        for (unsigned int ty = 0; ty < block.y; ++ty)
        for (unsigned int tx = 0; tx < block.x; ++tx)
            pool.emplace_back([=] { threadIdx = dim3{tx, ty, tz}; blockIdx = dim3{bx, by, bz}; body(); });
        for (auto& thread : pool) thread.join();
    }
}
"""

KERNEL_DECLARATION = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)'
)
POINTER_DTYPES = {
    "float": np.float32,
    "double": np.float64,
    "unsigned long long": np.uint64,
    "long long": np.int64,
    "int": np.int32,
    "short": np.int16,
    "signed char": np.int8,
}
SCALARS = {"long long": (np.int64, ctypes.c_longlong), "int": (np.int32, ctypes.c_int)}


def parse_parameters(text):
    """[(base C type, is_pointer, name)] of a kernel's parameter list."""
    parameters = []
    for parameter in text.split(","):
        words = parameter.replace("*", " * ").split()
        name = words[-1]
        pointer = "*" in words
        base = " ".join(w for w in words[:-1] if w not in ("const", "__restrict__", "*"))
        parameters.append((base, pointer, name))
    return parameters


class FakeArray(np.ndarray):
    """Stands for a cupy.ndarray (host memory, so the emulated kernels can use it)."""

    def get(self):
        return np.array(self)


class EmulatedKernel:
    def __init__(self, library, name, parameters):
        self.name = name
        self.parameters = parameters
        self.function = getattr(library, f"emu_launch_{name}")
        self.function.restype = None
        self.function.argtypes = [ctypes.c_uint] * 6 + [
            ctypes.c_void_p if pointer else SCALARS[base][1] for base, pointer, _ in parameters
        ]

    def __call__(self, grid, block, args):
        expected = len(self.parameters)
        assert len(args) == expected, f"{self.name}: {len(args)} arguments for {expected} parameters"
        converted = []
        for arg, (base, pointer, name) in zip(args, self.parameters):
            if pointer:
                where = f"{self.name}({name})"
                assert isinstance(arg, FakeArray), f"{where}: device array expected, got {type(arg)}"
                assert arg.dtype == POINTER_DTYPES[base], f"{where}: {base}* got {arg.dtype}"
                assert arg.flags.c_contiguous, f"{where} must be C-contiguous"
                converted.append(arg.ctypes.data)
            else:
                where = f"{self.name}({name})"
                assert type(arg) is SCALARS[base][0], f"{where}: {base} got {type(arg).__name__}"
                converted.append(arg)
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        assert all(g > 0 for g in grid) and 0 < block[0] * block[1] * block[2] <= 1024
        self.function(*grid, *block, *converted)


class EmulatedModule:
    """cupy.RawModule(code=...) compiled with g++ against the shim."""

    cache = {}

    def __init__(self, code, build_dir):
        if code not in self.cache:
            self.cache[code] = self.build(code, build_dir / f"module{len(self.cache)}")
        self.library, self.kernels = self.cache[code]

    @staticmethod
    def build(code, directory):
        directory.mkdir(parents=True)
        (directory / "kernel.cu").write_text(code)
        preprocess = [GXX, "-E", "-P", "-x", "c++", str(directory / "kernel.cu")]
        expanded = subprocess.run(preprocess, capture_output=True, text=True, check=True).stdout
        declarations = KERNEL_DECLARATION.findall(expanded)
        kernels_found = {name: parse_parameters(params) for name, params in declarations}
        assert kernels_found, "no extern \"C\" __global__ kernel found"
        wrappers = []
        for name, parameters in kernels_found.items():
            declared = ", ".join(
                f"{base}{' *' if pointer else ''} {arg}"
                for base, pointer, arg in parameters
            )
            passed = ", ".join(arg for _, _, arg in parameters)
            wrappers.append(
                f'extern "C" void emu_launch_{name}(unsigned gx, unsigned gy, unsigned gz, '
                f"unsigned bx, unsigned by, unsigned bz, {declared}) {{\n"
                f"    emu_launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, [=] {{ {name}({passed}); }});\n}}"
            )
        (directory / "emulated.cpp").write_text(SHIM + '#include "kernel.cu"\n' + "\n".join(wrappers) + "\n")
        library_path = directory / "emulated.so"
        source = directory / "emulated.cpp"
        result = subprocess.run(
            [GXX, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-w",
             "-o", str(library_path), str(source)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        library = ctypes.CDLL(str(library_path))
        launchers = {name: EmulatedKernel(library, name, params) for name, params in kernels_found.items()}
        return library, launchers

    def get_function(self, name):
        return self.kernels[name]


def fake_cupy(build_dir):
    module = types.ModuleType("fake_cupy")
    module.ndarray = FakeArray
    module.empty = lambda shape, dtype=np.float64: np.empty(shape, dtype).view(FakeArray)
    module.zeros = lambda shape, dtype=np.float64: np.zeros(shape, dtype).view(FakeArray)
    module.asarray = lambda array, dtype=None: np.ascontiguousarray(array, dtype=dtype).view(FakeArray)
    module.asnumpy = lambda array: np.array(array)
    module.any = lambda array: np.any(np.asarray(array))
    module.RawModule = lambda code, **options: EmulatedModule(code, build_dir)
    return module


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """The "gpu" device of test_kernels.py with the emulated CuPy in place of the real one."""
    fake = fake_cupy(tmp_path_factory.mktemp("emulated_cuda"))
    patched = [lowbit.backend, lowbit.kernels._checks, lowbit.kernels._cuda, lowbit.kernels.threshold]
    patched.append(test_kernels)
    saved = [module.cupy for module in patched]
    for module in patched:
        module.cupy = fake
    lowbit.kernels._cuda._module.cache_clear()
    yield test_kernels.Device("gpu")
    for module, original in zip(patched, saved):
        module.cupy = original
    lowbit.kernels._cuda._module.cache_clear()


@pytest.mark.parametrize("k", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.float16])
def test_pack_round_trip(device, k, dtype):
    x = (np.random.default_rng(k).standard_normal((3, k)) * 4).astype(dtype)
    x[0, 0], x[-1, -1] = 0, -0.0
    packed = kernels.pack_signs(device.put(x))
    np.testing.assert_array_equal(device.get(packed), reference.pack_signs_loops(x))
    for out_dtype in (np.float32, np.int8, np.float16):
        values = device.get(kernels.unpack_signs(packed, k, out_dtype))
        assert values.dtype == out_dtype
        np.testing.assert_array_equal(values, reference.sign_pm1(x))


def test_pack_nan(device):
    with pytest.raises(ValueError, match="NaN"):
        kernels.pack_signs(device.put(np.array([[1.0, np.nan]])))


@pytest.mark.parametrize(
    "m, n, k",
    [(1, 1, 1), (5, 7, 64), (9, 3, 65), (130, 129, 600), (128, 128, 512), (1, 300, 100), (257, 2, 30)],
)
def test_xnor_gemm(device, m, n, k):
    check_gemm(device, m, n, k, seed=m + n + k, style="gaussian")


@pytest.mark.parametrize(
    "channels, n_out, size, kernel, stride, padding",
    [
        (1, 1, 1, (1, 1), (1, 1), (0, 0)),
        (65, 9, 5, (3, 3), (2, 2), (1, 1)),
        (3, 33, 4, (3, 3), (1, 1), (2, 2)),
        (130, 5, 7, (1, 3), (1, 2), (0, 1)),
    ],
)
def test_binary_conv2d(device, channels, n_out, size, kernel, stride, padding):
    check_conv(device, 2, channels, n_out, size, size, kernel, stride, padding, seed=channels)


@pytest.mark.parametrize(
    "gamma, beta, mean, var, eps, dtype",
    [
        (1.0, 0.0, 3.0, 1.0, 0.0, np.float64),
        (-1.0, 0.0, 3.0, 1.0, 0.0, np.float64),
        (0.0, -1.0, 7.0, 1.0, 1e-5, np.float64),
        (1.0, 0.0, 1e9 + 3.3, 1.0, 0.0, np.float32),
    ],
)
def test_threshold(device, gamma, beta, mean, var, eps, dtype):
    test_kernels.test_threshold_edge_cases(device, gamma, beta, mean, var, eps, dtype)


def test_threshold_random(device):
    rng = np.random.default_rng(3)
    channels = 130
    gamma, beta = rng.normal(size=channels), rng.normal(size=channels)
    mean, var = rng.normal(0, 20, channels).round(), rng.random(channels) + 0.5
    acc = rng.integers(-40, 40, size=(2, 3, channels)).astype(np.int32)
    check_threshold(device, acc, gamma, beta, mean, var, 1e-5)


@pytest.mark.parametrize(
    "kernel, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 1), (1, 2)), ((1, 2), (1, 1), (0, 1))]
)
def test_maxpool(device, kernel, stride, padding):
    x = np.random.default_rng(7).standard_normal((2, 7, 6, 70))
    pooled = device.get(kernels.maxpool_packed(device.put(kernels.pack_signs(x)), kernel, stride, padding))
    expected = reference.maxpool_float(reference.sign_pm1(x), kernel, stride, padding)
    np.testing.assert_array_equal(pooled, reference.pack_signs_loops(expected))


def test_arguments_are_checked_on_the_device_path(device):
    test_kernels.test_bad_arguments_raise_clear_errors(device)
