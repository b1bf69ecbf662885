"""The CUDA sources build with this machine's nvcc, although no GPU is here.

No development or CI machine has a GPU (docs/design.md §4), so these tests are
what keeps the CUDA path honest:

* every ``csrc/**/*.cu`` file compiles to an object file for sm_80 and sm_90
  with the flags torch's CUDAExtension passes, warnings as errors;
* ``common.h``'s cost model compiles inside a ``__global__`` kernel, proving
  the helper the CPU and CUDA paths share is device-callable;
* the index maths of the CUDA kernels (``csrc/cuda/linear_math.cuh``) runs on
  the host, checked against brute force;
* the torch bindings ``csrc/cuda/*.cpp`` parse against torch's headers (when
  this torch ships its CUDA headers), warnings as errors;
* the kernels of ``csrc/cuda/linear_kernels.cu`` run: the host compiler builds
  them against a small emulation of the CUDA features they use (each CUDA
  thread a fiber, switched at ``__syncthreads`` and warp shuffles), and their
  norms and gradients are compared with float64 ground truth on shapes that
  reach every code path (edges, splits, every tile configuration). This checks
  indexing, barriers and reductions, not performance or the GPU memory model.

All compiler runs of the selected tests start together, one per core, when the
first of them is set up, so the module takes about as long as its slowest
compile plus the emulated runs (~80 s of CPU in all).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
ARCHS = ("80", "90")
BINDINGS = sorted((CSRC / "cuda").glob("*.cpp"))  # torch-facing, host-compiled

# What torch.utils.cpp_extension adds to every nvcc command (COMMON_NVCC_FLAGS):
# without implicit half/bfloat16 conversions, so the kernels must convert
# explicitly, as they will have to in the real build.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
WARNINGS_AS_ERRORS = ["-Xcompiler", "-Wall,-Wextra", "-Werror", "all-warnings"]
TIMEOUT = 600


def find_nvcc() -> str | None:
    """nvcc from PATH, else from $CUDA_HOME / $CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidate = Path(root) / "bin" / "nvcc"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


NVCC = find_nvcc()
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found on PATH or in $CUDA_HOME/bin; install the CUDA toolkit")


def gencode(arch: str) -> list[str]:
    return ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]


def nvcc_compile(source: Path, arch: str, out_dir: Path) -> list[str]:
    return [NVCC, "-c", "-std=c++17", "-O2", "-I", str(CSRC), *TORCH_NVCC_FLAGS,
            *WARNINGS_AS_ERRORS, "-Xcompiler", "-fPIC", *gencode(arch),
            str(source), "-o", str(out_dir / f"{source.stem}.sm_{arch}.o")]


COMMON_H_PROBE = textwrap.dedent("""\
    #include "common.h"

    // Compiles only if the cost model is callable from device code.
    __global__ void pick_methods(const long long* shapes, int* methods, int n) {
      const int i = blockIdx.x * blockDim.x + threadIdx.x;
      if (i >= n) return;
      const long long* s = shapes + 4 * i;
      methods[i] = static_cast<int>(gradnoise::choose_linear_norm_method(
          s[0], s[1], s[2], s[3], (i & 1) != 0));
    }
    """)

# Host checks of csrc/cuda/linear_math.cuh, compiled by the host compiler (as
# the CPU build would include it) and run; exit status 0 means all passed.
HOST_MATH_CHECK = textwrap.dedent("""\
    #include <cmath>
    #include <cstdio>
    #include <vector>

    #include "cuda/linear_math.cuh"

    using namespace gradnoise;
    static int failures = 0;
    #define CHECK(cond)                                                     \\
      do {                                                                  \\
        if (!(cond)) {                                                      \\
          std::printf("FAILED %s at line %d\\n", #cond, __LINE__);          \\
          if (++failures > 20) return 1;                                    \\
        }                                                                   \\
      } while (0)

    int main() {
      // Ghost tile pairs enumerate {(r, c): r <= c} column by column, each once.
      int64_t q = 0;
      for (int64_t c = 0; c < 2000; ++c)
        for (int64_t r = 0; r <= c; ++r, ++q) {
          const TilePair t = ghost_tile_pair(q);
          CHECK(t.row == r && t.col == c);
        }
      CHECK(ghost_num_tile_pairs(2000) == q);
      CHECK(ghost_num_tile_pairs(0) == 0 && ghost_num_tile_pairs(1) == 1);
      // Far beyond the exact range of the square root's seed.
      for (int64_t c : {int64_t(94906265), int64_t(2000000000)}) {
        const int64_t start = c * (c + 1) / 2;
        for (int64_t k : {int64_t(0), int64_t(1), c - 1, c}) {
          const TilePair t = ghost_tile_pair(start + k);
          CHECK(t.col == c && t.row == k);
        }
      }
      CHECK((ghost_pair_weight<double>(TilePair{3, 3}) == 1.0));
      CHECK((ghost_pair_weight<double>(TilePair{2, 3}) == 2.0));

      // Splits tile [0, units·unit_rows) in order, in whole units, none twice.
      for (int64_t units : {0, 1, 2, 5, 7, 64, 1000})
        for (int64_t unit_rows : {1, 3, 8})
          for (int64_t per : {1, 2, 3, 16, 999, 5000}) {
            int64_t expect = 0;
            const int64_t splits = (units + per - 1) / per;
            for (int64_t s = 0; s < splits + 2; ++s) {
              const RowRange r = split_rows(s, per, unit_rows, units);
              CHECK(r.begin == (s < splits ? expect : units * unit_rows));
              CHECK(r.begin <= r.end && r.begin % unit_rows == 0 && r.end % unit_rows == 0);
              expect = r.end;
            }
            CHECK(expect == units * unit_rows);
          }

      // Goodfellow: ‖dy xᵀ‖²_F computed entry by entry.
      const std::vector<double> x = {0.5, -1.25, 2.0}, dy = {3.0, -0.75};
      double brute = 0, xs = 0, ds = 0;
      for (double a : dy)
        for (double b : x) brute += (a * b) * (a * b);
      for (double b : x) xs += b * b;
      for (double a : dy) ds += a * a;
      CHECK(std::fabs(goodfellow_sq_norm(xs, ds, false) - brute) < 1e-12);
      CHECK(std::fabs(goodfellow_sq_norm(xs, ds, true) - (brute + ds)) < 1e-12);

      // Fused epilogue: squares, adds to the total, clears the sample tile.
      double sample[4] = {1, -2, 3, 0.5}, total[4] = {10, 10, 10, 10};
      CHECK((fold_sample_tile<double, 4, true>(sample, total) == 14.25));
      CHECK(total[0] == 11 && total[1] == 8 && total[2] == 13 && total[3] == 10.5);
      CHECK(sample[0] == 0 && sample[1] == 0 && sample[2] == 0 && sample[3] == 0);
      double again[2] = {2, 2};
      CHECK((fold_sample_tile<double, 2, false>(again, nullptr)) == 8.0);
      return failures == 0 ? 0 : 1;
    }
    """)


KERNELS = CSRC / "cuda" / "linear_kernels.cu"

# The CUDA emulation the kernels are compiled against on the host. Kernel
# launches `k<<<grid, block, smem, stream>>>(args)` are rewritten to
# `k ^ LaunchCfg(grid, block, smem, stream) ^ args(args)` (see emulation_source).
EMU_SHIM = r"""// Runs CUDA kernels on the host: each CUDA thread of a block is a ucontext
// fiber, switched cooperatively at __syncthreads and warp shuffles; a barrier
// that not every live thread (or, for shuffles, every lane) reaches aborts.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {
enum State { kRunnable, kAtSyncthreads, kAtShuffle, kDone };
struct Fiber {
  ucontext_t ctx;
  State state;
};
struct Block {
  ucontext_t sched;
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  std::vector<std::vector<unsigned char>> lanes;  // shuffle exchange, per warp
  int current = 0;
  uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  std::function<void()> body;
};
inline Block* blk = nullptr;

inline void wait(State s) {
  Fiber& f = blk->fibers[blk->current];
  f.state = s;
  swapcontext(&f.ctx, &blk->sched);
  blk->thread_idx = uint3{static_cast<unsigned>(blk->current), 0, 0};
}
inline void syncthreads() { wait(kAtSyncthreads); }
template <typename V>
V shfl_xor(V v, int offset) {
  static_assert(sizeof(V) <= 8, "shuffle of at most 8 bytes");
  const int t = blk->current, lane = t % 32;
  auto& x = blk->lanes[t / 32];
  std::memcpy(&x[8 * lane], &v, sizeof(V));
  wait(kAtShuffle);
  V r;
  std::memcpy(&r, &x[8 * (lane ^ offset)], sizeof(V));
  wait(kAtShuffle);  // nobody overwrites a lane before all have read
  return r;
}
inline void fiber_main() {
  blk->body();
  blk->fibers[blk->current].state = kDone;
}
[[noreturn]] inline void fail(const char* why) {
  std::fprintf(stderr, "emu: %s\n", why);
  std::abort();
}
inline void run_block(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  for (int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = b.stacks[t].data();
    f.ctx.uc_stack.ss_size = b.stacks[t].size();
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
    f.state = kRunnable;
  }
  for (;;) {
    for (int t = 0; t < n; ++t) {
      if (b.fibers[t].state != kRunnable) continue;
      b.current = t;
      b.thread_idx = uint3{static_cast<unsigned>(t), 0, 0};
      swapcontext(&b.sched, &b.fibers[t].ctx);
    }
    bool released = false, alive = false, all_sync = true;
    for (int w = 0; w < n / 32; ++w) {
      int at = 0;
      for (int l = 0; l < 32; ++l) at += b.fibers[32 * w + l].state == kAtShuffle;
      if (at == 32) {
        for (int l = 0; l < 32; ++l) b.fibers[32 * w + l].state = kRunnable;
        released = true;
      }
    }
    for (auto& f : b.fibers) {
      alive |= f.state != kDone;
      all_sync &= f.state == kDone || f.state == kAtSyncthreads;
    }
    if (!alive) return;
    if (released) continue;
    if (!all_sync) fail("deadlock: a __syncthreads or shuffle not reached by every thread");
    for (auto& f : b.fibers)
      if (f.state == kAtSyncthreads) f.state = kRunnable;
  }
}

struct LaunchCfg {
  dim3 grid, block;
  LaunchCfg(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {}
};
template <typename F>
struct Pending {
  F f;
  LaunchCfg cfg;
};
template <typename F>
Pending<F> operator^(F f, LaunchCfg c) { return Pending<F>{f, c}; }
template <typename... A>
std::tuple<A...> args(A... a) { return std::tuple<A...>(a...); }
template <typename F, typename... A>
int operator^(Pending<F> p, std::tuple<A...> a) {
  const dim3 g = p.cfg.grid, bd = p.cfg.block;
  const int n = static_cast<int>(bd.x * bd.y * bd.z);
  if (bd.y != 1 || bd.z != 1 || n % 32 != 0 || n > 1024) fail("1-D blocks of whole warps only");
  if (g.x == 0 || g.y == 0 || g.z == 0) fail("empty grid");
  Block b;
  b.fibers.resize(n);
  b.stacks.assign(n, std::vector<char>(1 << 16));
  b.lanes.assign(n / 32, std::vector<unsigned char>(8 * 32));
  b.block_dim = bd;
  b.grid_dim = g;
  b.body = [&] { std::apply(p.f, a); };
  Block* saved = blk;
  blk = &b;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) {
        b.block_idx = uint3{x, y, z};
        run_block(b);
      }
  blk = saved;
  return 0;
}
}  // namespace emu

#define threadIdx (::emu::blk->thread_idx)
#define blockIdx (::emu::blk->block_idx)
#define blockDim (::emu::blk->block_dim)
#define gridDim (::emu::blk->grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define __shfl_xor_sync(mask, v, offset) ::emu::shfl_xor((v), (offset))
#define cudaGetLastError() cudaSuccess
#define cudaMemsetAsync(ptr, value, n, stream) (std::memset((ptr), (value), (n)), cudaSuccess)
"""

EMU_DRIVER = textwrap.dedent("""\
    #include "cuda/linear_launchers.h"

    using gradnoise::NormMethod;
    using gradnoise::cuda::DType;

    extern "C" {
    size_t gn_workspace_bytes(int weight_grad, long B, long T, long d, long p, int dtype,
                              int bias, int method) {
      return weight_grad
          ? gradnoise::cuda::linear_weight_grad_and_sq_norms_workspace_bytes(
                B, T, d, p, DType(dtype), bias, NormMethod(method))
          : gradnoise::cuda::linear_sq_norms_workspace_bytes(B, T, d, p, DType(dtype), bias,
                                                             NormMethod(method));
    }
    int gn_sq_norms(const void* x, const void* g, void* norms, void* ws, size_t ws_bytes,
                    long B, long T, long d, long p, int dtype, int bias, int method) {
      return gradnoise::cuda::launch_linear_sq_norms(x, g, norms, ws, ws_bytes, B, T, d, p,
                                                     DType(dtype), bias, NormMethod(method),
                                                     nullptr);
    }
    int gn_weight_grad_and_sq_norms(const void* x, const void* g, void* gw, void* gb,
                                    void* norms, void* ws, size_t ws_bytes, long B, long T,
                                    long d, long p, int dtype, int bias, int method) {
      return gradnoise::cuda::launch_linear_weight_grad_and_sq_norms(
          x, g, gw, gb, norms, ws, ws_bytes, B, T, d, p, DType(dtype), bias,
          NormMethod(method), nullptr);
    }
    }
    """)


def emulation_source() -> str:
    """linear_kernels.cu with its launches in the emulation's syntax, plus the driver."""
    src, launches = re.subn(r"<<<(.*?)>>>\s*\(", r" ^ ::emu::LaunchCfg(\1) ^ ::emu::args(",
                            KERNELS.read_text(), flags=re.S)
    assert launches > 0, "no kernel launches found to rewrite"
    return src + "\n" + EMU_DRIVER


def torch_include_dirs() -> list[str] | None:
    """Header directories for the binding, or None if this torch lacks its CUDA headers."""
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    dirs = list(include_paths())
    if not any((Path(d) / "c10" / "cuda" / "CUDAStream.h").is_file() for d in dirs):
        return None
    return dirs


def cuda_include_dir() -> str | None:
    """The toolkit's include directory (nvcc may be a wrapper script outside it)."""
    roots = [Path(NVCC).resolve().parent.parent] if NVCC else []
    roots += [Path(r) for r in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                                "/usr/local/cuda") if r]
    for root in roots:
        if (root / "include" / "cuda_runtime_api.h").is_file():
            return str(root / "include")
    return None


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


class Jobs:
    """Compiler runs keyed by name, started together in a pool of one thread per core."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
        self.futures: dict[tuple, concurrent.futures.Future] = {}

    def start(self, key: tuple) -> None:
        if key in self.futures:
            return
        kind = key[0]
        if kind == "cu":
            fn = lambda: run(nvcc_compile(Path(key[1]), key[2], self.out_dir))  # noqa: E731
        elif kind == "common_h":
            fn = lambda: self._common_h(key[1])  # noqa: E731
        elif kind == "host_math":
            fn = self._host_math
        elif kind == "binding":
            fn = lambda: self._binding(Path(key[1]))  # noqa: E731
        elif kind == "emulation":
            fn = self._emulation
        else:
            raise KeyError(key)
        self.futures[key] = self.pool.submit(fn)

    def result(self, key: tuple) -> subprocess.CompletedProcess:
        self.start(key)
        return self.futures[key].result()

    def _common_h(self, arch: str):
        src = self.out_dir / f"common_h_probe_{arch}.cu"
        src.write_text(COMMON_H_PROBE)
        return run(nvcc_compile(src, arch, self.out_dir))

    def _host_math(self):
        src = self.out_dir / "linear_math_check.cpp"
        exe = self.out_dir / "linear_math_check"
        src.write_text(HOST_MATH_CHECK)
        built = run([CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC),
                     str(src), "-o", str(exe)])
        return built if built.returncode != 0 else run([str(exe)])

    def _binding(self, source: Path):
        cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
               # torch ships no c10/cuda/impl/cuda_cmake_macros.h without CUDA
               "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-I", str(CSRC)]
        for d in torch_include_dirs() + [cuda_include_dir(), sysconfig.get_paths()["include"]]:
            cmd += ["-isystem", d]
        return run(cmd + [str(source)])

    def _emulation(self):
        shim = self.out_dir / "emu_cuda.h"
        src = self.out_dir / "linear_kernels_emulated.cpp"
        lib = self.out_dir / "liblinear_kernels_emulated.so"
        shim.write_text(EMU_SHIM)
        src.write_text(emulation_source())
        proc = run([CXX, "-std=c++17", "-O1", "-fPIC", "-shared", "-w", "-include", str(shim),
                    "-I", str(CSRC), "-isystem", cuda_include_dir(), str(src), "-o", str(lib)])
        proc.library = lib
        return proc


def _job_key(item) -> tuple | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    name = getattr(item, "originalname", None)
    if name == "test_cu_file_compiles":
        return ("cu", str(params["source"]), params["arch"])
    if name == "test_common_h_is_device_callable":
        return ("common_h", params["arch"])
    if name == "test_linear_math_on_host":
        return ("host_math",)
    if name == "test_binding_parses_against_torch_headers":
        return ("binding", str(params["source"]))
    if name == "test_kernels_on_emulated_gpu":
        return ("emulation",)
    return None


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
    """Start every compile this session selected from this module, at once."""
    j = Jobs(tmp_path_factory.mktemp("nvcc"))
    keys = []
    for item in request.session.items:
        if getattr(item, "module", None) is request.module and not item.get_closest_marker("skip"):
            key = _job_key(item)
            skipped = any(m.args and m.args[0] for m in item.iter_markers("skipif"))
            if key is not None and not skipped and key not in keys:
                keys.append(key)
    # The emulated kernels' tests run after their build, one by one in this
    # process: build them first so they overlap the remaining compiles.
    for key in sorted(keys, key=lambda k: k[0] != "emulation"):
        j.start(key)
    yield j
    j.pool.shutdown(wait=True, cancel_futures=True)


def assert_ok(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, (
        f"{what} failed (exit {proc.returncode})\n$ {' '.join(proc.args)}\n"
        f"--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}")


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CSRC}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: str(p.relative_to(CSRC)))
def test_cu_file_compiles(jobs, source, arch):
    assert_ok(jobs.result(("cu", str(source), arch)), f"nvcc {source.relative_to(REPO)} for sm_{arch}")


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_common_h_is_device_callable(jobs, arch):
    assert_ok(jobs.result(("common_h", arch)),
              f"choose_linear_norm_method in a __global__ kernel for sm_{arch}")


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler (c++ or g++) found")
def test_linear_math_on_host(jobs):
    assert_ok(jobs.result(("host_math",)), "host checks of csrc/cuda/linear_math.cuh")


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler (c++ or g++) found")
@pytest.mark.skipif(torch_include_dirs() is None,
                    reason="this torch ships no c10/cuda headers to check the binding against")
@pytest.mark.skipif(cuda_include_dir() is None, reason="CUDA toolkit headers not found")
@pytest.mark.parametrize("source", BINDINGS, ids=lambda p: str(p.relative_to(CSRC)))
def test_binding_parses_against_torch_headers(jobs, source):
    assert_ok(jobs.result(("binding", str(source))),
              f"{source.relative_to(REPO)} against torch's headers")


# --- The kernels, run on the emulated GPU -----------------------------------

DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}  # cuda::DType
METHOD_CODES = {"goodfellow": 0, "ghost": 1, "fused": 2}  # gradnoise::NormMethod


def _emulation_cases():
    """(B, middle dims, d, p, dtype, with_bias, method, with_weight_grad) reaching every path."""
    shapes = [
        (3, (), 5, 7),          # T = 1
        (1, (), 1, 1),          # B = 1, one feature
        (0, (4,), 3, 5),        # B = 0: zero gradients, no norms
        (2, (0,), 5, 6),        # T = 0
        (3, (4,), 0, 5),        # d = 0: only the bias term
        (3, (4,), 5, 0),        # p = 0
        (2, (17,), 33, 65),     # samples end mid-chunk; ragged tiles
        (2, (3, 5), 7, 9),      # two middle dims (T = 15)
        (2, (150,), 9, 11),     # T > 64: several ghost tiles per side
        (16, (40,), 70, 70),    # row splits (p×d partials) and bias groups
        (300, (), 20, 70, ("goodfellow", "fused")),  # flat grad-bias groups, splits
        (2100, (), 5, 3, ("goodfellow",)),           # a warp per sample
    ]
    cases = []
    for B, mid, d, p, *only in shapes:
        T = 1
        for m in mid:
            T *= m
        methods = ["ghost", "fused"] + (["goodfellow"] if T == 1 else [])
        for method in only[0] if only else methods:
            cases.append((B, mid, d, p, "float32", True, method, True))
            cases.append((B, mid, d, p, "float32", False, method, False))
    for dtype in ("float64", "float16", "bfloat16"):
        for method in ("ghost", "fused"):
            cases.append((2, (17,), 33, 65, dtype, True, method, True))
        cases.append((5, (), 30, 20, dtype, True, "goodfellow", True))
    cases.append((16, (40,), 70, 70, "float64", True, "fused", True))  # double-tile splits
    cases.append((3, (5,), 1540, 1500, "float32", True, "fused", True))  # the 128×128 tile
    return cases


EMU_CASES = _emulation_cases()


def _case_id(case):
    B, mid, d, p, dtype, bias, method, wg = case
    shape = "x".join(str(s) for s in (B, *mid, d)) + f"-p{p}"
    return f"{method}-{shape}-{dtype}{'-bias' if bias else ''}{'-grad' if wg else ''}"


@pytest.fixture(scope="module")
def emulated(jobs):
    proc = jobs.result(("emulation",))
    assert_ok(proc, f"host build of {KERNELS.relative_to(REPO)} against the CUDA emulation")
    lib = ctypes.CDLL(str(proc.library))
    L, P, I, Z = ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    lib.gn_workspace_bytes.restype = Z
    lib.gn_workspace_bytes.argtypes = [I, L, L, L, L, I, I, I]
    lib.gn_sq_norms.argtypes = [P, P, P, P, Z, L, L, L, L, I, I, I]
    lib.gn_weight_grad_and_sq_norms.argtypes = [P, P, P, P, P, P, Z, L, L, L, L, I, I, I]
    return lib


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler (c++ or g++) found")
@pytest.mark.skipif(cuda_include_dir() is None, reason="CUDA toolkit headers not found")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulation uses ucontext")
@pytest.mark.parametrize("case", EMU_CASES, ids=_case_id)
def test_kernels_on_emulated_gpu(emulated, case):
    import torch

    B, mid, d, p, dtype_name, with_bias, method, with_weight_grad = case
    T = 1
    for m in mid:
        T *= m
    dtype = getattr(torch, dtype_name)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(B, *mid, d, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(B, *mid, p, generator=gen, dtype=torch.float64).to(dtype)

    # Outputs start as NaN and the scratch buffer as garbage: every element
    # must be written, and nothing may rely on zeroed scratch memory.
    norms = torch.full((B,), float("nan"), dtype=acc)
    grad_weight = torch.full((p, d), float("nan"), dtype=dtype)
    grad_bias = torch.full((p,), float("nan"), dtype=dtype)
    codes = (DTYPE_CODES[dtype_name], int(with_bias), METHOD_CODES[method])
    ws_bytes = emulated.gn_workspace_bytes(int(with_weight_grad), B, T, d, p, *codes)
    workspace = torch.full((max(ws_bytes, 1),), 0xAB, dtype=torch.uint8)

    def ptr(t):
        return t.data_ptr() if t.numel() else None

    if with_weight_grad:
        status = emulated.gn_weight_grad_and_sq_norms(
            ptr(x), ptr(g), ptr(grad_weight), ptr(grad_bias) if with_bias else None, ptr(norms),
            ptr(workspace), ws_bytes, B, T, d, p, *codes)
    else:
        status = emulated.gn_sq_norms(ptr(x), ptr(g), ptr(norms), ptr(workspace), ws_bytes,
                                      B, T, d, p, *codes)
    assert status == 0, f"launcher returned cudaError {status}"

    # Ground truth in float64 from the same (rounded) inputs.
    x3 = x.reshape(B, T, d).double()
    g3 = g.reshape(B, T, p).double()
    per_sample = torch.einsum("btp,btd->bpd", g3, x3)
    bias_sum = g3.sum(1)
    want = per_sample.square().sum((1, 2))
    if with_bias:
        want = want + bias_sum.square().sum(1)
    tol = dict(rtol=1e-12, atol=1e-12) if acc == torch.float64 else dict(rtol=3e-5, atol=1e-4)
    torch.testing.assert_close(norms.double(), want, **tol)
    if with_weight_grad:
        grad_tol = {torch.float64: dict(rtol=1e-12, atol=1e-12),
                    torch.float32: dict(rtol=3e-5, atol=1e-4),
                    torch.float16: dict(rtol=2e-3, atol=2e-3),
                    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}[dtype]
        torch.testing.assert_close(grad_weight.double(), per_sample.sum(0).to(dtype).double(),
                                   **grad_tol)
        if with_bias:
            torch.testing.assert_close(grad_bias.double(), bias_sum.sum(0).to(dtype).double(),
                                       **grad_tol)
