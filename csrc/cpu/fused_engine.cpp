// The fused engine: instruction-set selection, cache blocking and the
// threaded driver around the register kernel of fused_linear_impl.h
// (compiled once per instruction set below). See fused_engine.h.
#include "fused_engine.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <immintrin.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/cpu_isa.h"

namespace gradnoise {
namespace {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
namespace isa_avx512 {
#define GN_VEC_BYTES 64
#include "fused_linear_impl.h"
#undef GN_VEC_BYTES
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define GN_VEC_BYTES 32
#include "fused_linear_impl.h"
#undef GN_VEC_BYTES
}  // namespace isa_avx2
#pragma GCC pop_options

namespace isa_generic {
#define GN_VEC_BYTES 16
#include "fused_linear_impl.h"
#undef GN_VEC_BYTES
}  // namespace isa_generic

int64_t cache_bytes(int name, int64_t fallback) {
  const long v = sysconf(name);
  return v > 0 ? static_cast<int64_t>(v) : fallback;
}

// Per-thread scratch of both drivers, kept between calls (at most the packed
// group's scratch_bytes, a copy of C within kByThreadCopyBytes and the tiles):
// allocating it afresh on every call costs page faults comparable to the
// work of a small problem.
enum class ThreadScratch { kPacked, kRelaid, kTile, kCopyOfC, kCount };

void* thread_scratch(ThreadScratch use, size_t bytes) {
  struct Buffer {
    void* ptr = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(ptr); }
  };
  thread_local Buffer buffers[static_cast<int>(ThreadScratch::kCount)];
  Buffer& b = buffers[static_cast<int>(use)];
  if (b.bytes < bytes) {
    std::free(b.ptr);
    b.ptr = nullptr;
    b.bytes = 0;
    TORCH_CHECK(posix_memalign(&b.ptr, 64, std::max<size_t>(bytes, 64)) == 0,
                "gradnoise: out of memory allocating ", bytes, " bytes of kernel scratch");
    b.bytes = bytes;
  }
  return b.ptr;
}

// How the output C [p, d] is cut among threads and into cache tiles.
struct FusedPlan {
  int64_t slabs;        // one per thread
  bool split_columns;   // slabs are column ranges (else row ranges)
  int64_t mc, nc, kc;   // tile rows, tile columns, reduction chunk
};

// Largest weight gradient (bytes) for which each thread keeps its own copy
// and the samples are split among threads (run_fused_by_samples).
constexpr int64_t kByThreadCopyBytes = 256 << 10;

int64_t l2_bytes() { return cache_bytes(_SC_LEVEL2_CACHE_SIZE, 512 * 1024); }

// Block sizes from the cache sizes and the shape: the B micro-panel
// (kc × NR) fits half of L1; the C tile, its carry scratch and the packed
// panels fit in L2; slabs split C into equal parts, one per thread.
FusedPlan plan_fused(int64_t T_len, int64_t d, int64_t p, int64_t elem, int64_t mr, int64_t nr,
                     int64_t threads) {
  const int64_t l1 = cache_bytes(_SC_LEVEL1_DCACHE_SIZE, 32 * 1024);
  const int64_t l2 = l2_bytes();
  FusedPlan plan{};
  // Split the dimension that gives every thread whole register blocks.
  const int64_t col_blocks = ceil_div(d, nr), row_blocks = ceil_div(p, mr);
  plan.split_columns = col_blocks >= threads && (col_blocks % threads == 0 ||
                                                 row_blocks % threads != 0 || d >= p);
  const int64_t blocks = plan.split_columns ? col_blocks : row_blocks;
  plan.slabs = std::max<int64_t>(1, std::min(threads, blocks));
  const int64_t kc_max = std::max<int64_t>(16, (l1 / 2) / (nr * elem));
  plan.kc = std::min(T_len, kc_max);
  // Tile of C: about a quarter of L2 each for the tile and for its scratch.
  const int64_t tile_elems = std::max<int64_t>(mr * nr, l2 / 4 / elem);
  const int64_t slab_cols = plan.split_columns ? ceil_div(col_blocks, plan.slabs) * nr : d;
  const int64_t slab_rows = plan.split_columns ? p : ceil_div(row_blocks, plan.slabs) * mr;
  int64_t nc = std::min<int64_t>(slab_cols, std::max<int64_t>(nr, 256 / nr * nr));
  int64_t mc = std::max<int64_t>(mr, tile_elems / nc / mr * mr);
  mc = std::min(mc, slab_rows);
  if (const char* env = std::getenv("GRADNOISE_FUSED_BLOCKS")) {  // tuning knob: "mc,nc,kc"
    long a = 0, b = 0, c = 0;
    if (std::sscanf(env, "%ld,%ld,%ld", &a, &b, &c) == 3 && a > 0 && b > 0 && c > 0) {
      mc = ceil_div(a, mr) * mr;
      nc = ceil_div(b, nr) * nr;
      plan.kc = std::min<int64_t>(T_len, c);
    }
  }
  plan.mc = mc;
  plan.nc = nc;
  return plan;
}

// Whether the register kernel reads dY in place rather than packed: its rows
// must already be what the kernel reads (whole MR-wide pieces of contiguous
// rows in the accumulation type), and each thread must sweep them for few
// column strips, so that the packing pass would cost more than the in-place
// rows' extra cache lines and pages (measured on AVX-512 at B,T = 16,128:
// 4–13% faster for d = 256 and 512; slower from 16 sweeps up, e.g. d = 1024).
template <typename in_t, typename T>
bool read_dy_in_place(const OperandSource& g, int64_t p, int64_t mr, int64_t sweeps) {
  return std::is_same_v<in_t, T> && g.kind == OperandSource::Kind::kRows && g.ld == p &&
         p % mr == 0 && sweeps <= 8;
}

// How samples are laid out for the register kernel: the packed strips of dY
// (none when it is read in place) and of X, and, for a channels-first
// convolution input, the channels-last copy of each image that the patch
// packer reads (a tap's channels as one run).
template <typename K, typename in_t, typename T>
struct PackedLayout {
  int64_t a_strips, b_strips;
  bool relayout;
  ConvGeometry last;     // the geometry of the channels-last copy, if relayout
  int64_t image;         // elements of one channels-last image (0 without relayout)
  int64_t row_bytes;     // packed bytes of one row, all strips
  int64_t sample_bytes;  // packed and relaid bytes of one sample

  PackedLayout(const OperandSource& x, int64_t T_len, int64_t d, int64_t p, bool dy_in_place)
      : a_strips(ceil_div(p, K::MR)),
        b_strips(ceil_div(d, K::NR)),
        relayout(x.kind == OperandSource::Kind::kPatches && x.conv->channel_stride != 1),
        last(relayout ? *x.conv : ConvGeometry{}),
        image(0) {
    if (relayout) {
      last.channel_stride = 1;
      last.pixel_stride = last.channels;
      image = last.channels * last.in[0] * last.in[1] * last.in[2];
    }
    row_bytes = ((dy_in_place ? 0 : a_strips * K::MR) + b_strips * K::NR) *
                static_cast<int64_t>(sizeof(T));
    sample_bytes = row_bytes * T_len + image * static_cast<int64_t>(sizeof(in_t));
  }
};

// Samples split among threads, for a weight gradient small enough that each
// thread can hold its own copy (a convolution's, typically: few weights,
// many positions per sample). Each thread packs a few of its samples at a
// time into buffers that stay in its L2, runs the register kernel over the
// whole of C for them, and moves on; the copies of C are summed at the end.
// Against splitting C among threads, nothing is packed through the shared
// cache, there is no barrier between packing and computing, and every
// thread gets an equal share of the work however C divides.
template <typename Kern, typename in_t, typename T>
void run_fused_by_samples(const OperandSource& x, const OperandSource& g, int64_t B,
                          int64_t T_len, int64_t d, int64_t p, T* C, double* norms) {
  using K = typename Kern::template Kernel<T>;
  const FusedPlan plan = plan_fused(T_len, d, p, sizeof(T), K::MR, K::NR, /*threads=*/1);
  const bool dy_in_place = read_dy_in_place<in_t, T>(g, p, K::MR, ceil_div(d, K::NR));
  const PackedLayout<K, in_t, T> lay(x, T_len, d, p, dy_in_place);
  const int64_t a_strips = lay.a_strips, b_strips = lay.b_strips, image = lay.image;
  // A group's packed samples take at most a quarter of L2 (the tile of C
  // and its scratch take half).
  const int64_t group = std::max<int64_t>(1, std::min(B, l2_bytes() / 4 / lay.sample_bytes));
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
  const size_t c_elems = C != nullptr ? static_cast<size_t>(p * d) : 0;
  // Thread t > 0 sums its samples into its own copy of C (overwritten by its
  // first group), added to C at the end.
  std::vector<T*> copies(static_cast<size_t>(threads), nullptr);
  const size_t tile_elems = ceil_div(plan.mc, K::MR) * K::MR * ceil_div(plan.nc, K::NR) * K::NR;
  std::fill(norms, norms + B, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    // Shares t0..t1-1 are one run of samples, summed into one copy of C
    // (share 0's is C itself).
    const int64_t s0 = B * t0 / threads, s1 = B * t1 / threads;
    typename Kern::Blocking blk{plan.mc, plan.nc, plan.kc};
    T* pa = static_cast<T*>(thread_scratch(ThreadScratch::kPacked, lay.row_bytes * group * T_len));
    T* pb = dy_in_place ? pa : pa + a_strips * K::MR * group * T_len;
    void* relaid = lay.relayout ? thread_scratch(ThreadScratch::kRelaid, group * image * sizeof(in_t))
                            : nullptr;
    T* tile_sum = static_cast<T*>(thread_scratch(ThreadScratch::kTile, 2 * tile_elems * sizeof(T)));
    T* carry = tile_sum + tile_elems;
    T* Ct = C;
    if (C != nullptr && t0 > 0)
      Ct = copies[static_cast<size_t>(t0)] =
          static_cast<T*>(thread_scratch(ThreadScratch::kCopyOfC, c_elems * sizeof(T)));
    for (int64_t i0 = s0; i0 < s1; i0 += group) {
      const int64_t n = std::min(group, s1 - i0), rows = n * T_len;
      OperandSource xs = x;
      int64_t x_row0 = i0 * T_len;
      if (lay.relayout) {
        const in_t* src = static_cast<const in_t*>(x.data) + i0 * x.ld;
        in_t* dst = static_cast<in_t*>(relaid);
        for (int64_t b = 0; b < n; ++b)
          K::template to_channels_last<in_t>(src + b * x.ld, x.conv->channel_stride,
                                             lay.last.channels, 0, image / lay.last.channels,
                                             dst + b * image);
        xs = OperandSource{OperandSource::Kind::kPatches, relaid, image, &lay.last};
        x_row0 = 0;
      }
      if (!dy_in_place)
        K::template pack<K::MR, in_t>(g, T_len, i0 * T_len, p, 0, rows, rows, a_strips, pa);
      K::template pack<K::NR, in_t>(xs, T_len, x_row0, d, 0, rows, rows, b_strips, pb);
      const T* dy_rows = dy_in_place ? static_cast<const T*>(g.data) + i0 * T_len * p : nullptr;
      Kern::slab(pa, pb, n, T_len, p, d, 0, p, 0, d, Ct, norms + i0, blk, tile_sum, carry,
                 /*add=*/i0 > s0, dy_rows);
    }
  });
  if (C == nullptr || threads == 1) return;
  at::parallel_for(0, static_cast<int64_t>(c_elems), 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t t = 1; t < threads; ++t) {
      const T* src = copies[static_cast<size_t>(t)];
      if (src == nullptr) continue;  // its samples went with an earlier share
      for (int64_t e = e0; e < e1; ++e) C[e] += src[e];
    }
  });
}

template <typename Kern, typename in_t, typename T>
void run_fused(const OperandSource& x, const OperandSource& g, int64_t B, int64_t T_len,
               int64_t d, int64_t p, T* C, double* norms, int64_t scratch_bytes) {
  using K = typename Kern::template Kernel<T>;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // A copy of C per thread costs little next to the samples' work when C is
  // small and every thread has several samples, each of which packs into a
  // quarter of L2.
  const int64_t packed_sample = PackedLayout<K, in_t, T>(x, T_len, d, p, false).row_bytes * T_len;
  if (B >= 4 * threads && p * d * static_cast<int64_t>(sizeof(T)) <= kByThreadCopyBytes &&
      packed_sample <= l2_bytes() / 4)
    return run_fused_by_samples<Kern, in_t, T>(x, g, B, T_len, d, p, C, norms);
  const FusedPlan plan = plan_fused(T_len, d, p, sizeof(T), K::MR, K::NR, threads);
  const int64_t col_strips = ceil_div(d, K::NR);
  const int64_t sweeps = plan.split_columns ? ceil_div(col_strips, plan.slabs) : col_strips;
  const bool dy_in_place = read_dy_in_place<in_t, T>(g, p, K::MR, sweeps);
  const PackedLayout<K, in_t, T> lay(x, T_len, d, p, dy_in_place);
  const int64_t a_strips = lay.a_strips, b_strips = lay.b_strips, image = lay.image;
  const bool relayout = lay.relayout;
  const ConvGeometry& last = lay.last;
  // Samples are taken in groups whose packed X and dY stay in the last-level
  // cache while every tile of C reads them: each tile streams its group's
  // panels once per sample, so a group that spilled to DRAM would be re-read
  // from memory by every tile. A channels-first image is made channels-last
  // a group at a time, so no copy of the whole input is ever held.
  const int64_t group = std::max<int64_t>(1, std::min(B, scratch_bytes / lay.sample_bytes));
  const int64_t group_rows = group * T_len;
  // The packed group, the channels-last copy and the slabs' tiles live in the
  // calling thread's scratch, kept between calls: megabytes allocated afresh
  // on every call would come back from the allocator as new pages, a page
  // fault per 4 KiB, which cost ~5% of a transformer's backward.
  void* relaid = relayout ? thread_scratch(ThreadScratch::kRelaid, group * image * sizeof(in_t))
                          : nullptr;
  T* pa = static_cast<T*>(thread_scratch(ThreadScratch::kPacked, lay.row_bytes * group_rows));
  T* pb = dy_in_place ? pa : pa + a_strips * K::MR * group_rows;
  std::vector<double> partial(static_cast<size_t>(plan.slabs * B), 0.0);
  const int64_t unit = plan.split_columns ? K::NR : K::MR;
  const int64_t extent = plan.split_columns ? d : p;
  const int64_t units = ceil_div(extent, unit);
  const size_t tile_elems = ceil_div(plan.mc, K::MR) * K::MR * ceil_div(plan.nc, K::NR) * K::NR;
  // each slab's tile sum and carry, 64-byte aligned
  const size_t slab_elems = ceil_div(2 * tile_elems * sizeof(T), 64) * 64 / sizeof(T);
  T* tiles = static_cast<T*>(
      thread_scratch(ThreadScratch::kTile, plan.slabs * slab_elems * sizeof(T)));
  for (int64_t i0 = 0; i0 < B; i0 += group) {
    const int64_t n = std::min(group, B - i0), rows = n * T_len;
    // Pack this group into the strip order the register kernel reads
    // (converting half-precision input to float on the way).
    OperandSource xs = x;
    int64_t x_row0 = i0 * T_len;
    if (relayout) {
      const in_t* src = static_cast<const in_t*>(x.data) + i0 * x.ld;
      in_t* dst = static_cast<in_t*>(relaid);
      const int64_t pixels = image / last.channels;
      constexpr int64_t kPixels = 256;
      const int64_t blocks = ceil_div(pixels, kPixels);
      at::parallel_for(0, n * blocks, 1, [&](int64_t w0, int64_t w1) {
        for (int64_t w = w0; w < w1; ++w) {
          const int64_t b = w / blocks, q0 = w % blocks * kPixels;
          K::template to_channels_last<in_t>(src + b * x.ld, x.conv->channel_stride,
                                             last.channels, q0, std::min(pixels, q0 + kPixels),
                                             dst + b * image);
        }
      });
      xs = OperandSource{OperandSource::Kind::kPatches, relaid, image, &last};
      x_row0 = 0;
    }
    constexpr int64_t kPackRows = 64;
    at::parallel_for(0, ceil_div(rows, kPackRows), 1, [&](int64_t rb0, int64_t rb1) {
      const int64_t r0 = rb0 * kPackRows, r1 = std::min(rows, rb1 * kPackRows);
      if (!dy_in_place)
        K::template pack<K::MR, in_t>(g, T_len, i0 * T_len, p, r0, r1, rows, a_strips, pa);
      K::template pack<K::NR, in_t>(xs, T_len, x_row0, d, r0, r1, rows, b_strips, pb);
    });
    at::parallel_for(0, plan.slabs, 1, [&](int64_t begin, int64_t end) {
      typename Kern::Blocking blk{plan.mc, plan.nc, plan.kc};
      for (int64_t s = begin; s < end; ++s) {
        T* tile_sum = tiles + s * slab_elems;
        T* carry = tile_sum + tile_elems;
        // Equal shares of whole register blocks, one per thread.
        const int64_t u0 = units * s / plan.slabs, u1 = units * (s + 1) / plan.slabs;
        const int64_t lo = u0 * unit, hi = std::min(extent, u1 * unit);
        if (lo >= hi) continue;
        double* nrm = partial.data() + s * B + i0;
        const bool add = i0 > 0;
        const T* dy_rows = dy_in_place ? static_cast<const T*>(g.data) + i0 * T_len * p : nullptr;
        if (plan.split_columns)
          Kern::slab(pa, pb, n, T_len, p, d, 0, p, lo, hi, C, nrm, blk, tile_sum, carry, add,
                     dy_rows);
        else
          Kern::slab(pa, pb, n, T_len, p, d, lo, hi, 0, d, C, nrm, blk, tile_sum, carry, add,
                     dy_rows);
      }
    });
  }
  for (int64_t i = 0; i < B; ++i) {
    double s = 0.0;
    for (int64_t k = 0; k < plan.slabs; ++k) s += partial[k * B + i];
    norms[i] = s;
  }
}

// Adapters naming each instruction set's templates uniformly.
#define GN_ISA_ADAPTER(NAME, NS)                                                         \
  struct NAME {                                                                          \
    template <typename T>                                                                \
    using Kernel = NS::FusedKernel<T>;                                                   \
    using Blocking = NS::FusedBlocking;                                                  \
    template <typename T>                                                                \
    static void slab(const T* pa, const T* pb, int64_t B, int64_t T_len, int64_t p,      \
                     int64_t d, int64_t r0, int64_t r1, int64_t c0, int64_t c1, T* C,    \
                     double* norms, const Blocking& blk, T* tile_sum, T* carry,          \
                     bool add, const T* dy_rows) {                                       \
      NS::fused_linear_slab<T>(pa, pb, B, T_len, p, d, r0, r1, c0, c1, C, norms, blk,    \
                               tile_sum, carry, add, dy_rows);                           \
    }                                                                                    \
  };
GN_ISA_ADAPTER(Avx512, isa_avx512)
GN_ISA_ADAPTER(Avx2, isa_avx2)
GN_ISA_ADAPTER(Generic, isa_generic)
#undef GN_ISA_ADAPTER

}  // namespace

template <typename in_t, typename acc_t>
void run_fused_kernel(const OperandSource& x, const OperandSource& g, int64_t B, int64_t T,
                      int64_t d, int64_t p, acc_t* C, double* norms, int64_t scratch_bytes) {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      run_fused<Avx512, in_t, acc_t>(x, g, B, T, d, p, C, norms, scratch_bytes);
      break;
    case Isa::kAvx2:
      run_fused<Avx2, in_t, acc_t>(x, g, B, T, d, p, C, norms, scratch_bytes);
      break;
    default:
      run_fused<Generic, in_t, acc_t>(x, g, B, T, d, p, C, norms, scratch_bytes);
  }
}

template void run_fused_kernel<float, float>(const OperandSource&, const OperandSource&, int64_t,
                                             int64_t, int64_t, int64_t, float*, double*, int64_t);
template void run_fused_kernel<double, double>(const OperandSource&, const OperandSource&,
                                               int64_t, int64_t, int64_t, int64_t, double*,
                                               double*, int64_t);
template void run_fused_kernel<c10::BFloat16, float>(const OperandSource&, const OperandSource&,
                                                     int64_t, int64_t, int64_t, int64_t, float*,
                                                     double*, int64_t);
template void run_fused_kernel<c10::Half, float>(const OperandSource&, const OperandSource&,
                                                 int64_t, int64_t, int64_t, int64_t, float*,
                                                 double*, int64_t);

std::string cpu_kernel_isa() {
  std::string s = isa_name(cpu_isa());
  s += " (compiled: avx512, avx2, generic)";
  return s;
}

}  // namespace gradnoise
