// CPU kernels of the normalisation-layer per-sample-norm ops (schemas in
// registration.cpp, maths shared with CUDA in norm_layers_math.h).
//
//   layer_norm_sq_norms  x, dY viewed [B, T, C]; mean/rstd per row over C;
//                        gγ_b = Σ_t dY_b,t ⊙ x̂_b,t,  gβ_b = Σ_t dY_b,t
//   group_norm_sq_norms  x, dY viewed [B, C, S]; mean/rstd per (b, group) over
//                        (C/G)·S; gγ_b[c] = Σ_s dY·x̂,  gβ_b[c] = Σ_s dY
//   n_b = ‖gγ_b‖² + ‖gβ_b‖²                                   (Gray et al. 2024)
//
// Each row (group) comes from memory once: its statistics take two passes
// while it is in L1 (L2), then its contribution is added to the sample's
// accumulators. LayerNorm rows go four at a time, so that their reductions
// run as independent chains and their contributions are summed before they
// touch the accumulators. Work is split over samples, or over fixed-size chunks of rows
// (elements) when there are too few samples to keep every thread busy; the
// chunks' partial sums are added in chunk order, so the result is the same for
// any number of threads. Inner loops use GCC vector types and are compiled for
// AVX-512, AVX2+FMA and SSE2; the widest the CPU runs is used
// (GRADNOISE_CPU_ISA=avx512|avx2|generic overrides, as for the Linear ops).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/vec_kernels.h"
#include "norm_layers_checks.h"
#include "norm_layers_math.h"

namespace gradnoise {
namespace {

// ---------------------------------------------------------------------------
// LayerNorm / RMSNorm
// ---------------------------------------------------------------------------
template <typename S>
struct LnProblem {
  const S* x;
  const S* g;
  int64_t B, T, C;
  acc_of<S> eps;
  bool rms, with_weight, with_bias;
  int64_t chunks;  // of kNormRowsPerChunk rows, per sample
  int64_t width;   // accumulators per chunk: C for γ and/or C for β
  // The backward (layer_norm_backward_and_sq_norms): γ (all ones without), the
  // input gradient to write (nullptr: none), and where each sample's γ/β
  // gradients go ([B, width]; nullptr: nowhere).
  const acc_of<S>* gamma = nullptr;
  S* dx = nullptr;
  acc_of<S>* totals = nullptr;
};

template <int VB, typename S>
struct LnKernel {
  using A = acc_of<S>;
  static constexpr bool kConvert = !std::is_same_v<S, A>;

  static constexpr int kRowGroup = 4;

  // gγ (gg) and gβ (gb) += the contributions of NR consecutive rows starting
  // at row `r0` of the flattened [B·T, C] input, added up across the NR rows
  // first (fewer passes over the accumulators).
  template <int NR>
  static GN_INLINE void row_group(const LnProblem<S>& p, int64_t r0, A* __restrict gg,
                                  A* __restrict gb, A* xbuf, A* gbuf) {
    const int64_t C = p.C;
    const A* dy[NR];
    for (int r = 0; r < NR; ++r) dy[r] = as_acc(p.g + (r0 + r) * C, C, gbuf + r * C);
    if (!p.with_weight && p.dx == nullptr) {
      for (int64_t c = 0; c < C; ++c) {
        A sb = 0;
        for (int r = 0; r < NR; ++r) sb += dy[r][c];
        gb[c] += sb;
      }
      return;
    }
    const A* xr[NR];
    for (int r = 0; r < NR; ++r) xr[r] = as_acc(p.x + (r0 + r) * C, C, xbuf + r * C);
    A mean[NR], rstd[NR];
    if (p.rms) {
      Square sq[NR];
      reduce_rows<VB, NR>(xr, C, sq, rstd);
      for (int r = 0; r < NR; ++r) {
        mean[r] = 0;
        rstd[r] = norm_rstd(rstd[r], C, p.eps);
      }
    } else {
      Ident id[NR];
      reduce_rows<VB, NR>(xr, C, id, mean);
      SqDev<A> dev[NR];
      for (int r = 0; r < NR; ++r) dev[r].mean = mean[r] = norm_mean(mean[r], C);
      reduce_rows<VB, NR>(xr, C, dev, rstd);
      for (int r = 0; r < NR; ++r) rstd[r] = norm_rstd(rstd[r], C, p.eps);
    }
    if (p.with_weight && p.with_bias) {
      for (int64_t c = 0; c < C; ++c) {
        A sg = 0, sb = 0;
        for (int r = 0; r < NR; ++r) {
          sg += dy[r][c] * norm_xhat(xr[r][c], mean[r], rstd[r]);
          sb += dy[r][c];
        }
        gg[c] += sg;
        gb[c] += sb;
      }
    } else if (p.with_weight) {
      for (int64_t c = 0; c < C; ++c) {
        A sg = 0;
        for (int r = 0; r < NR; ++r) sg += dy[r][c] * norm_xhat(xr[r][c], mean[r], rstd[r]);
        gg[c] += sg;
      }
    } else if (p.with_bias) {
      for (int64_t c = 0; c < C; ++c) {
        A sb = 0;
        for (int r = 0; r < NR; ++r) sb += dy[r][c];
        gb[c] += sb;
      }
    }
    if (p.dx != nullptr)
      for (int r = 0; r < NR; ++r)
        input_grad_row(p, xr[r], dy[r], mean[r], rstd[r], p.dx + (r0 + r) * C);
  }

  // dX = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) with ĝ = γ ⊙ dY (RMSNorm: without
  // the mean(ĝ) term), the row already in L1.
  static GN_INLINE void input_grad_row(const LnProblem<S>& p, const A* __restrict x,
                                       const A* __restrict dy, A mean, A rstd, S* __restrict out) {
    const int64_t C = p.C;
    const A* __restrict gamma = p.gamma;  // never null here (ones when the layer has no γ)
    using V = typename Vec<VB, A>::type;
    constexpr int64_t L = VB / sizeof(A);
    A s1 = 0, s2 = 0;
    int64_t c = 0;
    if (C >= 2 * L) {
      V a0{}, a1{}, b0{}, b1{};
      for (; c + 2 * L <= C; c += 2 * L) {
        const V g0 = vload<VB>(gamma + c) * vload<VB>(dy + c);
        const V g1 = vload<VB>(gamma + c + L) * vload<VB>(dy + c + L);
        a0 += g0;
        a1 += g1;
        b0 += g0 * ((vload<VB>(x + c) - mean) * rstd);
        b1 += g1 * ((vload<VB>(x + c + L) - mean) * rstd);
      }
      s1 = hsum<VB, A>(a0 + a1);
      s2 = hsum<VB, A>(b0 + b1);
    }
    for (; c < C; ++c) {
      const A gh = gamma[c] * dy[c];
      s1 += gh;
      s2 += gh * norm_xhat(x[c], mean, rstd);
    }
    const A inv_c = A(1) / static_cast<A>(C);
    const A a = p.rms ? A(0) : s1 * inv_c, b = s2 * inv_c;
    for (int64_t k = 0; k < C; ++k)
      out[k] = static_cast<S>(rstd * (gamma[k] * dy[k] - a - norm_xhat(x[k], mean, rstd) * b));
  }

  // Rows [t0, t1) of sample b.
  static GN_INLINE void rows(const LnProblem<S>& p, int64_t b, int64_t t0, int64_t t1, A* gg,
                             A* gb, A* xbuf, A* gbuf) {
    int64_t t = t0;
    for (; t + kRowGroup <= t1; t += kRowGroup)
      row_group<kRowGroup>(p, b * p.T + t, gg, gb, xbuf, gbuf);
    for (; t < t1; ++t) row_group<1>(p, b * p.T + t, gg, gb, xbuf, gbuf);
  }

  // A chunk's accumulators are [γ | β], whichever of the two the flags ask for.
  static GN_INLINE A* beta_of(const LnProblem<S>& p, A* acc) {
    return p.with_weight ? acc + p.C : acc;
  }

  static GN_INLINE void chunk_rows(const LnProblem<S>& p, int64_t b, int64_t k, A* acc, A* xbuf,
                                   A* gbuf) {
    std::fill(acc, acc + p.width, A(0));
    const int64_t t0 = k * kNormRowsPerChunk;
    rows(p, b, t0, std::min(p.T, t0 + kNormRowsPerChunk), acc, beta_of(p, acc), xbuf, gbuf);
  }

  static GN_INLINE A norm(const LnProblem<S>& p, A* acc) {
    A n = 0;
    if (p.with_weight) n += reduce<VB>(acc, p.C, Square{});
    if (p.with_bias) n += reduce<VB>(beta_of(p, acc), p.C, Square{});
    return n;
  }

  // Samples [b0, b1), one after the other, chunk by chunk: chunk 0 goes
  // straight into the sample's accumulators, later chunks into `part`, added
  // after the chunk (the same sums, in the same order, as `chunks` below).
  static GN_INLINE void samples(const LnProblem<S>& p, int64_t b0, int64_t b1, A* out) {
    const int64_t w = p.width;
    std::vector<A> buf(2 * w + (kConvert ? 2 * kRowGroup * p.C : 0));
    A* total = buf.data();
    A* part = total + w;
    A* xbuf = part + w;
    A* gbuf = xbuf + kRowGroup * p.C;
    for (int64_t b = b0; b < b1; ++b) {
      chunk_rows(p, b, 0, total, xbuf, gbuf);
      for (int64_t k = 1; k < p.chunks; ++k) {
        chunk_rows(p, b, k, part, xbuf, gbuf);
        add_into(total, part, w);
      }
      out[b] = norm(p, total);
      if (p.totals != nullptr) std::copy(total, total + w, p.totals + b * w);
    }
  }

  // Work items [i0, i1) of (sample, chunk) pairs, i = b·chunks + k, each into
  // its own slot of `partial` ([B·chunks, width]).
  static GN_INLINE void chunks(const LnProblem<S>& p, int64_t i0, int64_t i1, A* partial) {
    std::vector<A> buf(kConvert ? 2 * kRowGroup * p.C : 0);
    for (int64_t i = i0; i < i1; ++i)
      chunk_rows(p, i / p.chunks, i % p.chunks, partial + i * p.width, buf.data(),
                 buf.data() + kRowGroup * p.C);
  }

  static GN_INLINE void combine(const LnProblem<S>& p, int64_t b0, int64_t b1, A* partial,
                                A* out) {
    for (int64_t b = b0; b < b1; ++b) {
      A* total = partial + b * p.chunks * p.width;
      for (int64_t k = 1; k < p.chunks; ++k) add_into(total, total + k * p.width, p.width);
      out[b] = norm(p, total);
      if (p.totals != nullptr) std::copy(total, total + p.width, p.totals + b * p.width);
    }
  }
};

// ---------------------------------------------------------------------------
// GroupNorm
// ---------------------------------------------------------------------------
template <typename S>
struct GnProblem {
  const S* x;
  const S* g;
  int64_t B, C, S_, G, cpg;  // S_ spatial points, cpg = C/G channels per group
  acc_of<S> eps;
  bool with_weight, with_bias;
};

template <int VB, typename S>
struct GnKernel {
  using A = acc_of<S>;
  static constexpr int64_t K = kNormElemsPerChunk;

  // Σ op over n values at p, in chunks of K added in order.
  template <typename Op>
  static GN_INLINE A chunked(const S* p, int64_t n, const Op& op, A* buf) {
    A total = 0;
    for (int64_t j = 0; j < n; j += K) {
      const int64_t m = std::min(K, n - j);
      total += reduce<VB>(as_acc(p + j, m, buf), m, op);
    }
    return total;
  }

  // One chunk [j, j + m) of a channel: (Σ dY·(x − mean), Σ dY).
  static GN_INLINE void channel_chunk(const GnProblem<S>& p, int64_t off, int64_t m, A mean,
                                      A& dot, A& sum, A* xbuf, A* gbuf) {
    const A* dy = as_acc(p.g + off, m, gbuf);
    if (p.with_weight) {
      dot_dev_and_sum<VB>(as_acc(p.x + off, m, xbuf), dy, m, mean, dot, sum);
    } else {
      dot = 0;
      sum = reduce<VB>(dy, m, Ident{});
    }
  }

  static GN_INLINE A group_stat(const GnProblem<S>& p, int64_t off, int64_t n, bool second,
                                A mean, A* buf) {
    return second ? chunked(p.x + off, n, SqDev<A>{mean}, buf) : chunked(p.x + off, n, Ident{}, buf);
  }

  // Items [i0, i1) of (sample, group) pairs, i = b·G + group, whole: the
  // group's statistics, then each channel's γ/β gradient and its square.
  static GN_INLINE void groups(const GnProblem<S>& p, int64_t i0, int64_t i1, A* part) {
    std::vector<A> buf(std::is_same_v<S, A> ? 0 : 2 * K);
    A* xbuf = buf.data();
    A* gbuf = xbuf + K;
    const int64_t n = p.cpg * p.S_;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t base = i * n;  // groups are consecutive blocks of n values
      A mean = 0, rstd = 0;
      if (p.with_weight) {
        mean = norm_mean(group_stat(p, base, n, false, A(0), xbuf), n);
        rstd = norm_rstd(group_stat(p, base, n, true, mean, xbuf), n, p.eps);
      }
      A acc = 0;
      for (int64_t c = 0; c < p.cpg; ++c) {
        A dot = 0, sum = 0;
        for (int64_t j = 0; j < p.S_; j += K) {
          A d, s;
          channel_chunk(p, base + c * p.S_ + j, std::min(K, p.S_ - j), mean, d, s, xbuf, gbuf);
          dot += d;
          sum += s;
        }
        acc += affine_sq_norm(rstd * dot, sum, p.with_weight, p.with_bias);
      }
      part[i] = acc;
    }
  }

  // Items [i0, i1) of (group, chunk) pairs of a statistics pass, i = bg·nck + k.
  static GN_INLINE void stat_chunks(const GnProblem<S>& p, bool second, int64_t i0, int64_t i1,
                                    int64_t nck, const A* mean, A* out) {
    std::vector<A> buf(std::is_same_v<S, A> ? 0 : K);
    const int64_t n = p.cpg * p.S_;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bg = i / nck, j = (i % nck) * K;
      const int64_t m = std::min(K, n - j);
      out[i] = group_stat(p, bg * n + j, m, second, second ? mean[bg] : A(0), buf.data());
    }
  }

  // Items [i0, i1) of (channel, chunk) pairs, i = (b·C + c)·ncs + k.
  static GN_INLINE void channel_chunks(const GnProblem<S>& p, int64_t i0, int64_t i1, int64_t ncs,
                                       const A* mean, A* dot, A* sum) {
    std::vector<A> buf(std::is_same_v<S, A> ? 0 : 2 * K);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bc = i / ncs, j = (i % ncs) * K;
      const int64_t bg = (bc / p.C) * p.G + (bc % p.C) / p.cpg;
      channel_chunk(p, bc * p.S_ + j, std::min(K, p.S_ - j), p.with_weight ? mean[bg] : A(0),
                    dot[i], sum[i], buf.data(), buf.data() + K);
    }
  }

  // Statistics of groups [bg0, bg1) from their chunks' partial sums (second
  // pass: Σ(x − mean)² → rstd, else Σx → mean).
  static GN_INLINE void finish_stats(const GnProblem<S>& p, bool second, int64_t bg0, int64_t bg1,
                                     int64_t nck, const A* s, A* mean, A* rstd) {
    const int64_t n = p.cpg * p.S_;
    for (int64_t bg = bg0; bg < bg1; ++bg) {
      A total = 0;
      for (int64_t k = 0; k < nck; ++k) total += s[bg * nck + k];
      if (second)
        rstd[bg] = norm_rstd(total, n, p.eps);
      else
        mean[bg] = norm_mean(total, n);
    }
  }

  // part[bg] for groups [bg0, bg1) from their channels' chunk sums, in the
  // order and arithmetic of `groups`.
  static GN_INLINE void finish_groups(const GnProblem<S>& p, int64_t bg0, int64_t bg1,
                                      int64_t ncs, const A* rstd, const A* dot, const A* sum,
                                      A* part) {
    for (int64_t bg = bg0; bg < bg1; ++bg) {
      A acc = 0;
      for (int64_t c = 0; c < p.cpg; ++c) {
        const int64_t i = (bg * p.cpg + c) * ncs;
        A d = 0, s = 0;
        for (int64_t k = 0; k < ncs; ++k) {
          d += dot[i + k];
          s += sum[i + k];
        }
        acc += affine_sq_norm(rstd[bg] * d, s, p.with_weight, p.with_bias);
      }
      part[bg] = acc;
    }
  }
};

// ---------------------------------------------------------------------------
// GroupNorm backward with the norms (group_norm_backward_and_sq_norms):
//   pass 1, per channel i = (n, c):  dsc_i = Σ_s dY·(x − μ),  db_i = Σ_s dY
//   pass 2, per channel:             dX = a·dY + b·x + c
// with a, b, c from the group's sums (see group_norm_backward_and_sq_norms_cpu).
// With the input gradient and groups enough for the threads, both passes
// run one group (n, g) at a time: the second finds the group's x and dY in
// cache, so the layer reads them from memory once instead of twice.
// ---------------------------------------------------------------------------
// Group q = (n, g) from its channels' sums: a_in[i] = rstd·γ_c for its
// channels i, and the group's c2, c3 of dX = a_in·dY + c2·x + c3.
template <typename A>
inline void gn_coefficients(int64_t q, int64_t C, int64_t G, int64_t Sp, const A* mean,
                            const A* rstd, const A* w, const A* dsc, const A* db, A* a_in, A* c2,
                            A* c3) {
  const int64_t D = C / G;
  const int64_t i0 = q / G * C + q % G * D;
  const A r = rstd[q], s = A(1) / static_cast<A>(D * Sp);
  A a = 0, bg = 0;
  for (int64_t i = i0; i < i0 + D; ++i) {
    const A wc = w[i % C];
    a += wc * dsc[i];
    bg += wc * db[i];
    a_in[i] = r * wc;
  }
  c2[q] = -a * r * r * r * s;
  c3[q] = -c2[q] * mean[q] - bg * r * s;
}

template <int VB, typename S>
struct GnBackwardKernel {
  using A = acc_of<S>;

  static GN_INLINE void sums(const S* x, const S* g, int64_t Sp, int64_t C, int64_t G,
                             int64_t i0, int64_t i1, const A* mean, A* dsc, A* db) {
    const int64_t D = C / G;
    std::vector<A> bx(std::is_same_v<S, A> ? 0 : Sp), bg(std::is_same_v<S, A> ? 0 : Sp);
    for (int64_t i = i0; i < i1; ++i) {
      const A* xa = as_acc(x + i * Sp, Sp, bx.data());
      const A* ga = as_acc(g + i * Sp, Sp, bg.data());
      dot_dev_and_sum<VB, A>(xa, ga, Sp, mean[i / C * G + i % C / D], dsc[i], db[i]);
    }
  }

  // Groups q in [q0, q1) (q = n·G + g), each whole: pass 1 over its D
  // channels, its coefficients, then pass 2. a_in [N·C], c2, c3 [N·G] are
  // written for these groups only.
  static GN_INLINE void groups(const S* x, const S* g, S* dx, int64_t Sp, int64_t C, int64_t G,
                               int64_t q0, int64_t q1, const A* mean, const A* rstd, const A* w,
                               A* dsc, A* db, A* a_in, A* c2, A* c3) {
    const int64_t D = C / G;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t i0 = q / G * C + q % G * D, i1 = i0 + D;
      sums(x, g, Sp, C, G, i0, i1, mean, dsc, db);
      gn_coefficients(q, C, G, Sp, mean, rstd, w, dsc, db, a_in, c2, c3);
      input_grad(x, g, dx, Sp, C, i0, i1, a_in, c2, c3, D, G);
    }
  }

  static GN_INLINE void input_grad(const S* x, const S* g, S* dx, int64_t Sp, int64_t C,
                                   int64_t i0, int64_t i1, const A* a, const A* b, const A* c,
                                   int64_t D, int64_t G) {
    using V = typename Vec<VB, A>::type;
    constexpr int64_t L = VB / sizeof(A);
    std::vector<A> bx(std::is_same_v<S, A> ? 0 : Sp), bg(std::is_same_v<S, A> ? 0 : Sp);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t ng = i / C * G + i % C / D;
      const A ai = a[i], bi = b[ng], ci = c[ng];
      const A* xa = as_acc(x + i * Sp, Sp, bx.data());
      const A* ga = as_acc(g + i * Sp, Sp, bg.data());
      S* o = dx + i * Sp;
      int64_t j = 0;
      if constexpr (std::is_same_v<S, A>) {
        for (; j + L <= Sp; j += L) {
          const V v = ai * vload<VB>(ga + j) + bi * vload<VB>(xa + j) + ci;
          std::memcpy(o + j, &v, VB);
        }
      }
      for (; j < Sp; ++j) o[j] = static_cast<S>(ai * ga[j] + bi * xa[j] + ci);
    }
  }
};

// ---------------------------------------------------------------------------
// Per-instruction-set entry points: the always_inline kernels above take the
// target of the function they are inlined into.
// ---------------------------------------------------------------------------
#define GN_NORM_ISA(NAME, VB, TARGET)                                                         \
  struct NAME {                                                                               \
    template <typename S>                                                                     \
    TARGET static void ln_samples(const LnProblem<S>& p, int64_t b0, int64_t b1,              \
                                  acc_of<S>* out) {                                           \
      LnKernel<VB, S>::samples(p, b0, b1, out);                                               \
    }                                                                                         \
    template <typename S>                                                                     \
    TARGET static void ln_chunks(const LnProblem<S>& p, int64_t i0, int64_t i1,               \
                                 acc_of<S>* partial) {                                        \
      LnKernel<VB, S>::chunks(p, i0, i1, partial);                                            \
    }                                                                                         \
    template <typename S>                                                                     \
    TARGET static void ln_combine(const LnProblem<S>& p, int64_t b0, int64_t b1,              \
                                  acc_of<S>* partial, acc_of<S>* out) {                       \
      LnKernel<VB, S>::combine(p, b0, b1, partial, out);                                      \
    }                                                                                         \
    template <typename S>                                                                     \
    TARGET static void gn_groups(const GnProblem<S>& p, int64_t i0, int64_t i1,               \
                                 acc_of<S>* part) {                                           \
      GnKernel<VB, S>::groups(p, i0, i1, part);                                               \
    }                                                                                         \
    template <typename S>                                                                     \
    TARGET static void gn_stat_chunks(const GnProblem<S>& p, bool second, int64_t i0,         \
                                      int64_t i1, int64_t nck, const acc_of<S>* mean,         \
                                      acc_of<S>* out) {                                       \
      GnKernel<VB, S>::stat_chunks(p, second, i0, i1, nck, mean, out);                        \
    }                                                                                         \
    template <typename S>                                                                     \
    TARGET static void gn_channel_chunks(const GnProblem<S>& p, int64_t i0, int64_t i1,       \
                                         int64_t ncs, const acc_of<S>* mean, acc_of<S>* dot,  \
                                         acc_of<S>* sum) {                                    \
      GnKernel<VB, S>::channel_chunks(p, i0, i1, ncs, mean, dot, sum);                        \
    }                                                                                         \
    template <typename S>                                                                     \
    TARGET static void gn_finish_stats(const GnProblem<S>& p, bool second, int64_t bg0,       \
                                       int64_t bg1, int64_t nck, const acc_of<S>* s,          \
                                       acc_of<S>* mean, acc_of<S>* rstd) {                    \
      GnKernel<VB, S>::finish_stats(p, second, bg0, bg1, nck, s, mean, rstd);                 \
    }                                                                                         \
    template <typename S>                                                                     \
    TARGET static void gn_finish_groups(const GnProblem<S>& p, int64_t bg0, int64_t bg1,      \
                                        int64_t ncs, const acc_of<S>* rstd,                   \
                                        const acc_of<S>* dot, const acc_of<S>* sum,           \
                                        acc_of<S>* part) {                                    \
      GnKernel<VB, S>::finish_groups(p, bg0, bg1, ncs, rstd, dot, sum, part);                 \
    }                                                                                         \
    template <typename S>                                                                     \
    TARGET static void gn_backward_sums(const S* x, const S* g, int64_t Sp, int64_t C,        \
                                        int64_t G, int64_t i0, int64_t i1,                    \
                                        const acc_of<S>* mean, acc_of<S>* dsc,                \
                                        acc_of<S>* db) {                                      \
      GnBackwardKernel<VB, S>::sums(x, g, Sp, C, G, i0, i1, mean, dsc, db);                   \
    }                                                                                         \
    template <typename S>                                                                     \
    TARGET static void gn_backward_input(const S* x, const S* g, S* dx, int64_t Sp,           \
                                         int64_t C, int64_t i0, int64_t i1,                   \
                                         const acc_of<S>* a, const acc_of<S>* b,              \
                                         const acc_of<S>* c, int64_t D, int64_t G) {          \
      GnBackwardKernel<VB, S>::input_grad(x, g, dx, Sp, C, i0, i1, a, b, c, D, G);            \
    }                                                                                         \
    template <typename S>                                                                     \
    TARGET static void gn_backward_groups(const S* x, const S* g, S* dx, int64_t Sp,          \
                                          int64_t C, int64_t G, int64_t q0, int64_t q1,       \
                                          const acc_of<S>* mean, const acc_of<S>* rstd,       \
                                          const acc_of<S>* w, acc_of<S>* dsc, acc_of<S>* db,  \
                                          acc_of<S>* a_in, acc_of<S>* c2, acc_of<S>* c3) {    \
      GnBackwardKernel<VB, S>::groups(x, g, dx, Sp, C, G, q0, q1, mean, rstd, w, dsc, db,     \
                                      a_in, c2, c3);                                          \
    }                                                                                         \
  };

GN_NORM_ISA(IsaAvx512, 64, __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))))
GN_NORM_ISA(IsaAvx2, 32, __attribute__((target("avx2,fma"))))
GN_NORM_ISA(IsaGeneric, 16, )
#undef GN_NORM_ISA

template <typename Fn>
void with_norm_isa(Fn&& fn) {
  with_isa<IsaAvx512, IsaAvx2, IsaGeneric>(std::forward<Fn>(fn));
}

// Whether items that are too few, or do not divide evenly over the threads,
// are worth cutting into chunks.
bool split_pays(int64_t items, int64_t threads) {
  return items < threads || (items < 8 * threads && items % threads != 0);
}

// Enough items per task that a task is at least ~32k elements of work.
int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, elems_per_item));
}

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------
// Samples one per task, or (sample, chunk of rows) pairs when there are too
// few samples to keep every thread busy; the same sums either way.
template <typename S>
void run_layer_norm(const LnProblem<S>& p, acc_of<S>* out, const at::TensorOptions& opts) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  with_norm_isa([&](auto isa) {
    using Isa_ = decltype(isa);
    if (p.chunks > 1 && split_pays(p.B, threads)) {
      at::Tensor partial = at::empty({p.B * p.chunks * std::max<int64_t>(1, p.width)}, opts);
      acc_of<S>* part = partial.data_ptr<acc_of<S>>();
      at::parallel_for(0, p.B * p.chunks, grain_for(kNormRowsPerChunk * p.C),
                       [&](int64_t i0, int64_t i1) {
        Isa_::template ln_chunks<S>(p, i0, i1, part);
      });
      at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
        Isa_::template ln_combine<S>(p, b0, b1, part, out);
      });
    } else {
      at::parallel_for(0, p.B, grain_for(p.T * p.C), [&](int64_t b0, int64_t b1) {
        Isa_::template ln_samples<S>(p, b0, b1, out);
      });
    }
  });
}

at::Tensor layer_norm_sq_norms_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                   int64_t normalized_numel, double eps, bool rms,
                                   bool with_weight, bool with_bias) {
  const auto [B, T, C] =
      layer_norm_shape(x, grad_out, normalized_numel, eps, at::kCPU, "CPU");
  at::Tensor out = at::zeros({B}, x.options().dtype(acc_type(x.scalar_type())));
  if (B == 0 || T == 0 || !(with_weight || with_bias)) return out;
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "gradnoise_layer_norm_sq_norms", [&] {
    using A = acc_of<scalar_t>;
    LnProblem<scalar_t> p{xc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), B, T, C,
                          static_cast<A>(eps), rms, with_weight, with_bias,
                          norm_num_chunks(T, kNormRowsPerChunk),
                          (with_weight ? C : 0) + (with_bias ? C : 0)};
    run_layer_norm(p, out.data_ptr<A>(), out.options());
  });
  return out;
}

// LayerNorm's (RMSNorm's) whole backward with the per-sample norms: each row
// is read once; its statistics, its share of the sample's γ/β gradients and
// its input gradient are computed while it is in L1. dγ, dβ are the sums of
// the per-sample gradients over the samples, in order (the same for any
// number of threads).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_and_sq_norms_cpu(
    const at::Tensor& x, const at::Tensor& grad_out, int64_t normalized_numel, double eps,
    bool rms, const c10::optional<at::Tensor>& weight_opt, bool need_input_grad,
    bool with_weight, bool with_bias) {
  const auto [B, T, C] =
      layer_norm_shape(x, grad_out, normalized_numel, eps, at::kCPU, "CPU");
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor* weight = weight_opt.has_value() && weight_opt->defined() ? &*weight_opt : nullptr;
  TORCH_CHECK(weight == nullptr || weight->numel() == C, "gradnoise: `weight` must have ",
              "normalized_numel = ", C, " entries, got ", weight == nullptr ? 0 : weight->numel());
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  const at::Tensor w_t = weight != nullptr ? weight->reshape({C}).to(acc).contiguous()
                                           : at::ones({C}, x.options().dtype(acc));
  at::Tensor out = at::zeros({B}, x.options().dtype(acc));
  at::Tensor grad_input = need_input_grad ? at::empty_like(xc) : at::empty({0}, x.options());
  const int64_t width = (with_weight ? C : 0) + (with_bias ? C : 0);
  at::Tensor totals = at::zeros({B, width}, x.options().dtype(acc));
  if (B > 0 && T > 0 && C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                    "gradnoise_layer_norm_backward", [&] {
      using A = acc_of<scalar_t>;
      LnProblem<scalar_t> p{xc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), B, T, C,
                            static_cast<A>(eps), rms, with_weight, with_bias,
                            norm_num_chunks(T, kNormRowsPerChunk), width};
      p.gamma = w_t.data_ptr<A>();
      p.dx = need_input_grad ? grad_input.data_ptr<scalar_t>() : nullptr;
      p.totals = width > 0 ? totals.data_ptr<A>() : nullptr;
      run_layer_norm(p, out.data_ptr<A>(), out.options());
    });
  }
  if (!(with_weight || with_bias)) out.zero_();
  const at::Tensor summed = totals.sum(0);  // [width], over the samples in order
  const auto wdt = weight != nullptr ? weight->scalar_type() : x.scalar_type();
  // Copies, not views of `summed`: the outputs must not alias.
  at::Tensor grad_weight = with_weight ? summed.narrow(0, 0, C).to(wdt, false, true)
                                       : at::empty({0}, x.options());
  at::Tensor grad_bias = with_bias ? summed.narrow(0, with_weight ? C : 0, C).to(wdt, false, true)
                                   : at::empty({0}, x.options());
  return {grad_input, grad_weight, grad_bias, out};
}

at::Tensor group_norm_sq_norms_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                   int64_t groups, double eps, bool with_weight,
                                   bool with_bias) {
  const auto [B, C, S] = group_norm_shape(x, grad_out, groups, eps, at::kCPU, "CPU");
  at::Tensor out = at::zeros({B}, x.options().dtype(acc_type(x.scalar_type())));
  if (B == 0 || C == 0 || S == 0 || !(with_weight || with_bias)) return out;
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t G = groups, cpg = C / G, n = cpg * S;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "gradnoise_group_norm_sq_norms", [&] {
    using A = acc_of<scalar_t>;
    GnProblem<scalar_t> p{xc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), B, C, S, G, cpg,
                          static_cast<A>(eps), with_weight, with_bias};
    A* o = out.data_ptr<A>();
    std::vector<A> part(B * G);
    with_norm_isa([&](auto isa) {
      using Isa_ = decltype(isa);
      if (n > kNormElemsPerChunk && split_pays(B * G, threads)) {
        // Few, large groups: statistics over chunks of each group, then the
        // channels (in chunks of S), each phase split over all threads.
        const auto opts = out.options();
        at::Tensor mean_t = at::zeros({B * G}, opts), rstd_t = at::zeros({B * G}, opts);
        A* mean = mean_t.data_ptr<A>();
        A* rstd = rstd_t.data_ptr<A>();
        if (with_weight) {
          const int64_t nck = norm_num_chunks(n, kNormElemsPerChunk);
          at::Tensor s_t = at::empty({B * G * nck}, opts);
          A* s = s_t.data_ptr<A>();
          for (const bool second : {false, true}) {
            at::parallel_for(0, B * G * nck, grain_for(kNormElemsPerChunk),
                             [&](int64_t i0, int64_t i1) {
              Isa_::template gn_stat_chunks<scalar_t>(p, second, i0, i1, nck, mean, s);
            });
            Isa_::template gn_finish_stats<scalar_t>(p, second, 0, B * G, nck, s, mean, rstd);
          }
        }
        const int64_t ncs = norm_num_chunks(S, kNormElemsPerChunk);
        at::Tensor ds_t = at::empty({2, B * C * ncs}, opts);
        A* dot = ds_t.data_ptr<A>();
        A* sum = dot + B * C * ncs;
        at::parallel_for(0, B * C * ncs, grain_for(std::min(S, kNormElemsPerChunk)),
                         [&](int64_t i0, int64_t i1) {
          Isa_::template gn_channel_chunks<scalar_t>(p, i0, i1, ncs, mean, dot, sum);
        });
        Isa_::template gn_finish_groups<scalar_t>(p, 0, B * G, ncs, rstd, dot, sum, part.data());
      } else {
        at::parallel_for(0, B * G, grain_for(n), [&](int64_t i0, int64_t i1) {
          Isa_::template gn_groups<scalar_t>(p, i0, i1, part.data());
        });
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      A total = 0;
      for (int64_t g = 0; g < G; ++g) total += part[b * G + g];
      o[b] = total;
    }
  });
  return out;
}

// GroupNorm's backward with the per-sample norms of γ and β folded in. For
// sample n, group g (mean μ, rstd r from the forward), channel c (D channels
// of S points per group, s = 1/(D·S)):
//   pass 1:  dsc_nc = Σ_s dY·(x − μ),  db_nc = Σ_s dY
//            gγ_nc = r·dsc_nc, gβ_nc = db_nc;  n_n = Σ_c gγ_nc² + gβ_nc²
//            dγ_c = Σ_n gγ_nc,  dβ_c = Σ_n gβ_nc
//   per group:  A = Σ_c γ_c·dsc_nc,  Bg = Σ_c γ_c·db_nc,
//            c2 = −A·r³·s,  c3 = −c2·μ − Bg·r·s
//   pass 2:  dX = r·γ_c·dY + c2·x + c3
// which is torch's input gradient up to the order of the sums: the norms cost
// O(N·C) on top of the two passes the backward makes anyway. Each channel is
// reduced by one thread in a fixed order, so the result does not depend on
// the number of threads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_backward_and_sq_norms_cpu(
    const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& mean,
    const at::Tensor& rstd, const c10::optional<at::Tensor>& weight_opt, int64_t groups,
    bool need_input_grad, bool with_weight, bool with_bias) {
  const auto [N, C, Sp] = group_norm_shape(x, grad_out, groups, 0.0, at::kCPU, "CPU");
  const int64_t G = groups, D = C / G;
  const auto st = x.scalar_type();
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mean.numel() == N * G && rstd.numel() == N * G, "gradnoise: `mean` and `rstd` must "
              "have N·groups = ", N * G, " entries (as native_group_norm returns), got ",
              mean.numel(), " and ", rstd.numel());
  const at::Tensor* weight = weight_opt.has_value() && weight_opt->defined() ? &*weight_opt : nullptr;
  TORCH_CHECK(weight == nullptr || weight->numel() == C, "gradnoise: `weight` must have C = ", C,
              " entries, got ", weight == nullptr ? 0 : weight->numel());
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  const at::Tensor mu_t = mean.reshape({N * G}).to(acc).contiguous();
  const at::Tensor r_t = rstd.reshape({N * G}).to(acc).contiguous();
  const at::Tensor w_t = weight != nullptr ? weight->reshape({C}).to(acc).contiguous()
                                           : at::ones({C}, x.options().dtype(acc));
  at::Tensor grad_input = need_input_grad ? at::empty_like(xc) : at::empty({0}, x.options());
  at::Tensor norms = at::zeros({N}, x.options().dtype(acc));
  at::Tensor grad_weight = at::zeros({C}, x.options().dtype(acc));
  at::Tensor grad_bias = at::zeros({C}, x.options().dtype(acc));
  if (N > 0 && C > 0 && Sp > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "gradnoise_group_norm_backward", [&] {
      using A = acc_of<scalar_t>;
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      const scalar_t* gp = gc.data_ptr<scalar_t>();
      const A* mu = mu_t.data_ptr<A>();
      const A* r = r_t.data_ptr<A>();
      const A* w = w_t.data_ptr<A>();
      std::vector<A> dsc(N * C), db(N * C);
      with_norm_isa([&](auto isa) {
        // One group at a time when there are groups enough for every
        // thread; else (e.g. GroupNorm(1, C) on a small batch) two passes,
        // each shared among threads by channel.
        const bool by_group = need_input_grad && N * G >= 2 * at::get_num_threads();
        std::vector<A> a_in(need_input_grad ? N * C : 0), c2(N * G), c3(N * G);
        scalar_t* dx = need_input_grad ? grad_input.data_ptr<scalar_t>() : nullptr;
        if (by_group) {
          at::parallel_for(0, N * G, grain_for(D * Sp), [&](int64_t q0, int64_t q1) {
            decltype(isa)::template gn_backward_groups<scalar_t>(
                xp, gp, dx, Sp, C, G, q0, q1, mu, r, w, dsc.data(), db.data(), a_in.data(),
                c2.data(), c3.data());
          });
          return;
        }
        at::parallel_for(0, N * C, grain_for(Sp), [&](int64_t i0, int64_t i1) {
          decltype(isa)::template gn_backward_sums<scalar_t>(xp, gp, Sp, C, G, i0, i1, mu,
                                                             dsc.data(), db.data());
        });
        if (!need_input_grad) return;
        for (int64_t q = 0; q < N * G; ++q)
          gn_coefficients(q, C, G, Sp, mu, r, w, dsc.data(), db.data(), a_in.data(), c2.data(),
                          c3.data());
        at::parallel_for(0, N * C, grain_for(Sp), [&](int64_t i0, int64_t i1) {
          decltype(isa)::template gn_backward_input<scalar_t>(
              xp, gp, dx, Sp, C, i0, i1, a_in.data(), c2.data(), c3.data(), D, G);
        });
      });
      // γ and β gradients (summed over samples) and the per-sample norms.
      A* nrm = norms.data_ptr<A>();
      A* dw = grad_weight.data_ptr<A>();
      A* dbias = grad_bias.data_ptr<A>();
      for (int64_t n = 0; n < N; ++n) {
        A total = 0;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = n * C + c;
          const A gamma_grad = r[n * G + c / D] * dsc[i];
          if (with_weight) total += gamma_grad * gamma_grad;
          if (with_bias) total += db[i] * db[i];
          dw[c] += gamma_grad;
          dbias[c] += db[i];
        }
        nrm[n] = total;
      }
    });
  }
  const auto wdt = weight != nullptr ? weight->scalar_type() : st;
  return {grad_input, with_weight ? grad_weight.to(wdt) : at::empty({0}, x.options()),
          with_bias ? grad_bias.to(wdt) : at::empty({0}, x.options()), norms};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradnoise, CPU, m) {
  m.impl("layer_norm_sq_norms", &layer_norm_sq_norms_cpu);
  m.impl("group_norm_sq_norms", &group_norm_sq_norms_cpu);
  m.impl("group_norm_backward_and_sq_norms", &group_norm_backward_and_sq_norms_cpu);
  m.impl("layer_norm_backward_and_sq_norms", &layer_norm_backward_and_sq_norms_cpu);
}

}  // namespace gradnoise
