// The fused weight-gradient + per-sample-norm kernel for one instruction set.
//
// fused_engine.cpp includes this file once per instruction set, each time inside
// its own namespace and `#pragma GCC target`, with GN_VEC_BYTES set to the
// vector width. Nothing here may include headers: they come before.
//
// What it computes, for X [B, T, d] and dY [B, T, p] (Linear layer input and
// output gradient):
//     C      = Σ_i G_i,       G_i = dY_iᵀ X_i   (the weight gradient, [p, d])
//     n_i   += ‖G_i‖²_F                          (per-sample squared norm)
// G_i is never stored: C is cut into tiles that stay in L2; for each tile the
// samples are visited in order and a sample's contribution to an MR×(2 vectors)
// block is summed in registers over that sample's T rows. At the sample
// boundary the registers are added into C and their squares into n_i, so the
// norm costs one fma per weight-gradient element per sample (1/T of the GEMM).
// T longer than one reduction chunk is carried across chunks in a scratch
// copy of the tile.

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(GN_VEC_BYTES)));
};

template <typename T>
struct FusedKernel {
  using V = typename VecOf<T>::type;
  static constexpr int L = GN_VEC_BYTES / sizeof(T);  // lanes per vector
  // Rows of C per block: 8×2 accumulators of 32 AVX-512 registers; 6×2 of
  // 16 registers below (the B vectors and A broadcasts need the rest).
  static constexpr int MR = GN_VEC_BYTES == 64 ? 8 : 6;
  static constexpr int NV = 2;                        // vectors per block row
  static constexpr int NR = NV * L;                   // columns of C per block
  static_assert(MR % 2 == 0, "the norm epilogue sums rows in pairs");

  static inline V load(const T* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(T* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  static inline T hsum(V v) {
    T s = 0;
#pragma GCC unroll 16
    for (int l = 0; l < L; ++l) s += v[l];
    return s;
  }

  // One MR×NR block of one sample's chunk: acc = Σ_k A[k]ᵀ B[k], with
  // A [kc][MR] at row stride `lda` (rows of dY: packed, lda = MR, or read
  // in place) and B packed [kc][NR] (rows of X).
  // `A_next` is the A strip of the block that follows: it is fetched into L1
  // during this block (one line per few k), so that the next block does not
  // wait on L2 for each of its lines.
  //   carry_in:  start from the block saved in `carry` (earlier chunk)
  //   carry_out: save to `carry` and stop (more chunks of this sample follow)
  //   otherwise: norm += acc² (lanes summed later) and, unless `sum` is null,
  //              sum (+)= acc (store when `first_sample`).
  // `carry` and `sum` are packed MR×NR blocks, padding included: rows and
  // columns beyond the edge of C were packed as zeros and stay zero.
  static inline void block(int64_t kc, const T* __restrict A, const T* __restrict Bp,
                           T* __restrict carry, bool carry_in, bool carry_out,
                           T* __restrict sum, bool first_sample, V& norm,
                           const T* A_next, int64_t lda) {
    V acc[MR][NV];
    if (carry_in) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = load(carry + r * NR + v * L);
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V{};
    }
    if (sum != nullptr && !carry_out && !first_sample) {
      // Bring this block's running sum towards L1 while the loop runs.
#pragma GCC unroll 8
      for (int r = 0; r < MR * NR * static_cast<int>(sizeof(T)); r += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(sum) + r, 1, 3);
    }
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
      const V b0 = load(Bp + k * NR);
      const V b1 = load(Bp + k * NR + L);
      const T* a = A + k * lda;
      __builtin_prefetch(A_next + k * lda, 0, 3);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        acc[r][0] += a[r] * b0;
        acc[r][1] += a[r] * b1;
      }
    }
    if (carry_out) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) store(carry + r * NR + v * L, acc[r][v]);
      return;
    }
    // A tree of independent sums keeps the squares off one long fma chain.
    V sq[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) sq[r] = acc[r][0] * acc[r][0] + acc[r][1] * acc[r][1];
#pragma GCC unroll 8
    for (int r = 1; r < MR; r += 2) sq[r - 1] += sq[r];
#pragma GCC unroll 8
    for (int r = 2; r < MR; r += 2) sq[0] += sq[r];
    norm += sq[0];
    if (sum == nullptr) return;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        T* c = sum + r * NR + v * L;
        store(c, first_sample ? acc[r][v] : load(c) + acc[r][v]);
      }
  }

  // C[rows, cols] (+)= the valid mr×nr part of a packed block.
  static inline void unpack_block(const T* __restrict blk, T* __restrict C, int64_t ldc, int mr,
                                  int nr, bool add) {
    if (mr == MR && nr == NR) {
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          T* c = C + r * ldc + v * L;
          const V b = load(blk + r * NR + v * L);
          store(c, add ? load(c) + b : b);
        }
      return;
    }
    for (int r = 0; r < mr; ++r)
      for (int j = 0; j < nr; ++j)
        C[r * ldc + j] = add ? C[r * ldc + j] + blk[r * NR + j] : blk[r * NR + j];
  }

  // Pack rows [row0 + r0, row0 + r1) of the operand `src` ([B·T, n], see
  // OperandSource) into strips of W columns: out[strip][r][W] for r in
  // [r0, r1), `rows_total` rows per strip, zero-padded to whole strips.
  template <int W, typename in_t>
  static void pack(const OperandSource& src, int64_t T_len, int64_t row0, int64_t n, int64_t r0,
                   int64_t r1, int64_t rows_total, int64_t n_strips, T* __restrict out) {
    const in_t* data = static_cast<const in_t*>(src.data);
    switch (src.kind) {
      case OperandSource::Kind::kRows:
        pack_strips<W>(data + row0 * src.ld, src.ld, n, r0, r1, rows_total, 0, n_strips, out);
        return;
      case OperandSource::Kind::kChannelsFirst:
        pack_channels_first<W>(data, src.ld, T_len, row0, n, r0, r1, rows_total, n_strips, out);
        return;
      case OperandSource::Kind::kPatches:
        pack_patches<W>(data, src.ld, *src.conv, T_len, row0, n, r0, r1, rows_total, n_strips,
                        out);
        return;
    }
  }

  // [B, n, T] layout: a packed column is a contiguous run of one channel.
  // Runs never cross a sample; each packed row is written whole, reading W
  // channel streams in step.
  template <int W, typename in_t>
  static void pack_channels_first(const in_t* __restrict data, int64_t ld, int64_t T_len,
                                  int64_t row0, int64_t n, int64_t r0, int64_t r1,
                                  int64_t rows_total, int64_t n_strips, T* __restrict out) {
    for (int64_t s = 0; s < n_strips; ++s) {
      T* o = out + s * rows_total * W;
      for (int64_t r = r0; r < r1;) {
        const int64_t b = (row0 + r) / T_len, t = (row0 + r) % T_len;
        const int64_t run = T_len - t < r1 - r ? T_len - t : r1 - r;
        const in_t* base = data + b * ld + t + s * W * T_len;
        T* orow = o + r * W;
        if ((s + 1) * W <= n) {
          for (int64_t k = 0; k < run; ++k)
#pragma GCC unroll 16
            for (int j = 0; j < W; ++j) orow[k * W + j] = static_cast<T>(base[j * T_len + k]);
        } else {
          for (int64_t k = 0; k < run; ++k)
            for (int j = 0; j < W; ++j)
              orow[k * W + j] = s * W + j < n ? static_cast<T>(base[j * T_len + k]) : T(0);
        }
        r += run;
      }
    }
  }

  // Implicit im2col from a channels-last image: row b·T + t is the patch of
  // output position t of image b, columns ordered (tap, channel), so that a
  // tap's channels are one contiguous run of the image (and, with dilation 1
  // along the last dim and one group, a whole row of taps is). Zeros in the
  // padding. Output positions advance along the last dim without division.
  template <int W, typename in_t>
  static void pack_patches(const in_t* __restrict data, int64_t ld, const ConvGeometry& cg,
                           int64_t T_len, int64_t row0, int64_t n, int64_t r0, int64_t r1,
                           int64_t rows_total, int64_t n_strips, T* __restrict out) {
    const int64_t ch = cg.channels, pix = cg.pixel_stride;  // channel_stride is 1
    const int64_t row_pitch = cg.in[2] * pix, plane_pitch = cg.in[1] * row_pitch;
    const int64_t k2 = cg.kernel[2], dil2 = cg.dilation[2];
    const bool merge_taps = dil2 == 1 && pix == ch;  // a row of taps is contiguous
    // One packed row is assembled here, then copied out strip by strip.
    constexpr int64_t kRowMax = 4096;
    T row_buf[kRowMax];
    const bool buffered = n_strips * W <= kRowMax;
    T* row_out = nullptr;  // where column 0 of the current row goes, if buffered
    // Copies `len` columns starting at column `col` of packed row r.
    auto put = [&](int64_t r, int64_t col, const in_t* src, int64_t len) {
      if (buffered) {
        copy_run(row_out + col, src, len);
        return;
      }
      while (len > 0) {
        const int64_t s = col / W, j = col % W, m = W - j < len ? W - j : len;
        T* o = out + (s * rows_total + r) * W + j;
        if (src != nullptr) {
          for (int64_t q = 0; q < m; ++q) o[q] = static_cast<T>(src[q]);
          src += m;
        } else {
          for (int64_t q = 0; q < m; ++q) o[q] = T(0);
        }
        col += m;
        len -= m;
      }
    };
    int64_t b = (row0 + r0) / T_len, t = (row0 + r0) % T_len;
    int64_t o2 = t % cg.out[2], o1 = t / cg.out[2] % cg.out[1], o0 = t / cg.out[2] / cg.out[1];
    for (int64_t r = r0; r < r1; ++r) {
      // One strip: its row is the packed row itself.
      row_out = n_strips == 1 ? out + r * W : row_buf;
      const in_t* img = data + b * ld;
      const int64_t z0 = o0 * cg.stride[0] - cg.padding[0];
      const int64_t y0 = o1 * cg.stride[1] - cg.padding[1];
      const int64_t x0 = o2 * cg.stride[2] - cg.padding[2];
      const bool x_inside = x0 >= 0 && x0 + (k2 - 1) * dil2 < cg.in[2];
      int64_t col = 0;
      for (int64_t a = 0; a < cg.kernel[0]; ++a) {
        const int64_t z = z0 + a * cg.dilation[0];
        for (int64_t c = 0; c < cg.kernel[1]; ++c, col += k2 * ch) {
          const int64_t y = y0 + c * cg.dilation[1];
          if (z < 0 || z >= cg.in[0] || y < 0 || y >= cg.in[1]) {
            put(r, col, nullptr, k2 * ch);
            continue;
          }
          const in_t* line = img + z * plane_pitch + y * row_pitch;
          if (merge_taps && x_inside) {
            put(r, col, line + x0 * pix, k2 * ch);
            continue;
          }
          for (int64_t e = 0; e < k2; ++e) {
            const int64_t x = x0 + e * dil2;
            put(r, col + e * ch, x >= 0 && x < cg.in[2] ? line + x * pix : nullptr, ch);
          }
        }
      }
      if (col < n_strips * W) put(r, col, nullptr, n_strips * W - col);
      if (buffered && n_strips > 1)
        for (int64_t s = 0; s < n_strips; ++s)
          copy_run(out + (s * rows_total + r) * W, row_buf + s * W, W);
      if (++o2 == cg.out[2]) {
        o2 = 0;
        if (++o1 == cg.out[1]) {
          o1 = 0;
          if (++o0 == cg.out[0]) {
            o0 = 0;
            ++b;
          }
        }
      }
    }
    (void)n;
  }

  // dst[q] = src[q] (zeros if src is null) for q < len. Runs are short (a
  // kernel row's taps of a few channels): whole vectors, then one masked
  // vector for the rest, rather than calls to memcpy or memset.
  template <typename in_t>
  static inline void copy_run(T* __restrict dst, const in_t* __restrict src, int64_t len) {
    int64_t q = 0;
    if constexpr (std::is_same_v<in_t, T>) {
      if (src != nullptr)
        for (; q + L <= len; q += L) store(dst + q, load(src + q));
      else
        for (; q + L <= len; q += L) store(dst + q, V{});
    }
#if GN_VEC_BYTES == 64
    if constexpr (std::is_same_v<in_t, float> && std::is_same_v<T, float>) {
      if (q < len) {
        const __mmask16 m = static_cast<__mmask16>((1u << (len - q)) - 1);
        _mm512_mask_storeu_ps(dst + q, m,
                              src != nullptr ? _mm512_maskz_loadu_ps(m, src + q) : _mm512_setzero_ps());
      }
      return;
    }
#endif
    if (src != nullptr)
      for (; q < len; ++q) dst[q] = static_cast<T>(src[q]);
    else
      for (; q < len; ++q) dst[q] = T(0);
  }

  // dst[q·channels + c] = src[c·cs + q] for pixels q in [q0, q1): one
  // channels-first sample made channels-last.
  template <typename in_t>
  static void to_channels_last(const in_t* __restrict src, int64_t cs, int64_t channels,
                               int64_t q0, int64_t q1, in_t* __restrict dst) {
    int64_t c0 = 0;
#if GN_VEC_BYTES >= 32
    if constexpr (std::is_same_v<in_t, float>) {
      for (; c0 + 8 <= channels; c0 += 8) {
        int64_t q = q0;
        for (; q + 8 <= q1; q += 8) transpose8x8(src + c0 * cs + q, cs, dst + q * channels + c0, channels);
        for (; q < q1; ++q)
          for (int64_t c = c0; c < c0 + 8; ++c) dst[q * channels + c] = src[c * cs + q];
      }
    }
#endif
    for (; c0 < channels; c0 += 16) {
      const int64_t c1 = c0 + 16 < channels ? c0 + 16 : channels;
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t q = q0; q < q1; ++q) dst[q * channels + c] = src[c * cs + q];
    }
  }

#if GN_VEC_BYTES >= 32
  // d[j·ld + i] = s[i·ls + j] for an 8×8 block of floats.
  static inline void transpose8x8(const float* __restrict s, int64_t ls, float* __restrict d,
                                  int64_t ld) {
    __m256 r[8], t[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ls);
#pragma GCC unroll 4
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
#pragma GCC unroll 2
    for (int h = 0; h < 8; h += 4) {
      r[h] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_ps(d + i * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
      _mm256_storeu_ps(d + (i + 4) * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
  }
#endif

  // Pack rows [r0, r1) of `src` ([rows, n] with row stride `ld`) into strips
  // of W columns: out[strip][row][W] with `rows_total` rows per strip,
  // zero-padded to whole strips. Strips [s0, s1) only. Rows go in blocks of
  // 64: the source block stays in L2 while every strip takes its piece of it,
  // so each source line is fetched from memory once, and each strip is
  // written in runs of whole cache lines (shorter runs cost a read of every
  // destination line they only partly fill).
  template <int W, typename in_t>
  static void pack_strips(const in_t* __restrict src, int64_t ld, int64_t n, int64_t r0,
                          int64_t r1, int64_t rows_total, int64_t s0, int64_t s1,
                          T* __restrict out) {
    constexpr int64_t block = 64;
    const int64_t full = n / W < s1 ? n / W : s1;  // strips with W valid columns
    for (int64_t rb = r0; rb < r1; rb += block) {
      const int64_t re = rb + block < r1 ? rb + block : r1;
      for (int64_t s = s0; s < s1; ++s) {
        T* o = out + s * rows_total * W;
        const in_t* base = src + s * W;
        if constexpr (std::is_same_v<in_t, T>) {
          if (s < full) {
            // A fixed-size copy compiles to a few vector moves (the loop
            // below would become a call to memmove per row).
            for (int64_t r = rb; r < re; ++r)
              __builtin_memcpy(o + r * W, base + r * ld, W * sizeof(T));
            continue;
          }
        }
        if (s < full) {
          for (int64_t r = rb; r < re; ++r) {
            const in_t* row = base + r * ld;
#pragma GCC unroll 16
            for (int j = 0; j < W; ++j) o[r * W + j] = static_cast<T>(row[j]);
          }
        } else {
          const int64_t cols = n - s * W;
          for (int64_t r = rb; r < re; ++r) {
            const in_t* row = base + r * ld;
            for (int j = 0; j < W; ++j) o[r * W + j] = j < cols ? static_cast<T>(row[j]) : T(0);
          }
        }
      }
    }
  }
};

// Block sizes of the fused kernel (rows of C per tile, columns of C per tile,
// longest reduction chunk), all multiples of the register block.
struct FusedBlocking {
  int64_t mc, nc, kc;
};

// One thread's share: rows [r0, r1) × columns [c0, c1) of C (multiples of
// MR and NR, except at the edges of C), all samples. Reads the packed
// operands: pa [ceil(p/MR)][B·T][MR] (dY) and pb [ceil(d/NR)][B·T][NR] (X);
// or, if `dy_rows` is given, dY in place from it ([B·T, p] row-major, p a
// multiple of MR) instead of pa.
// A tile of C is summed in `tile_sum` (packed blocks, so that each block is
// a few adjacent cache lines in L2) and written to C (added to it when
// `add_to_C`: an earlier group of samples is there) when its samples are done.
// norms: this slab's per-sample partial sums, accumulated (+=).
template <typename T>
void fused_linear_slab(const T* pa, const T* pb, int64_t B, int64_t T_len, int64_t p,
                       int64_t d, int64_t r0, int64_t r1, int64_t c0, int64_t c1, T* C,
                       double* norms, const FusedBlocking& blk, T* tile_sum, T* carry,
                       bool add_to_C, const T* dy_rows) {
  using K = FusedKernel<T>;
  constexpr int64_t kBlock = K::MR * K::NR;
  const int64_t rows = B * T_len;  // rows of each packed strip
  const int64_t lda = dy_rows != nullptr ? p : K::MR;
  // Row `row` of A strip `strip` (strips of MR rows of C).
  auto a_strip = [&](int64_t strip, int64_t row) {
    return dy_rows != nullptr ? dy_rows + row * p + strip * K::MR : pa + (strip * rows + row) * K::MR;
  };
  const int64_t nchunks = T_len <= blk.kc ? 1 : (T_len + blk.kc - 1) / blk.kc;
  const int64_t chunk = (T_len + nchunks - 1) / nchunks;
  for (int64_t jc = c0; jc < c1; jc += blk.nc) {
    const int64_t nc = c1 - jc < blk.nc ? c1 - jc : blk.nc;
    const int64_t n_strips = (nc + K::NR - 1) / K::NR;
    for (int64_t ic = r0; ic < r1; ic += blk.mc) {
      const int64_t mc = r1 - ic < blk.mc ? r1 - ic : blk.mc;
      const int64_t m_strips = (mc + K::MR - 1) / K::MR;
      for (int64_t i = 0; i < B; ++i) {
        typename K::V norm_i = {};
        for (int64_t ch = 0; ch < nchunks; ++ch) {
          const int64_t k0 = ch * chunk;
          const int64_t kc = T_len - k0 < chunk ? T_len - k0 : chunk;
          if (kc <= 0) break;
          const bool carry_in = ch > 0;
          const bool carry_out = k0 + kc < T_len;
          const int64_t row0 = i * T_len + k0;
          for (int64_t js = 0; js < n_strips; ++js) {
            const T* bstrip = pb + ((jc / K::NR + js) * rows + row0) * K::NR;
            for (int64_t is = 0; is < m_strips; ++is) {
              const T* astrip = a_strip(ic / K::MR + is, row0);
              const T* anext = a_strip(ic / K::MR + (is + 1 < m_strips ? is + 1 : 0), row0);
              const int64_t b = js * m_strips + is;
              K::block(kc, astrip, bstrip, carry + b * kBlock, carry_in, carry_out,
                       C == nullptr ? nullptr : tile_sum + b * kBlock, i == 0, norm_i, anext, lda);
            }
          }
        }
        norms[i] += static_cast<double>(K::hsum(norm_i));
      }
      if (C == nullptr) continue;
      for (int64_t js = 0; js < n_strips; ++js) {
        const int64_t col = jc + js * K::NR;
        const int nr = static_cast<int>(d - col < K::NR ? d - col : K::NR);
        for (int64_t is = 0; is < m_strips; ++is) {
          const int64_t row = ic + is * K::MR;
          const int mr = static_cast<int>(p - row < K::MR ? p - row : K::MR);
          K::unpack_block(tile_sum + (js * m_strips + is) * kBlock, C + row * d + col, d, mr, nr,
                          add_to_C);
        }
      }
    }
  }
}
