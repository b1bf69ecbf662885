// The fused weight-gradient + per-sample-norm engine, shared by the Linear
// and convolution CPU ops.
//
// For a problem X [B, T, d], dY [B, T, p] (viewed as [B·T, f] matrices, row
// r = b·T + t) it computes
//     C    (=) Σ_i dY_iᵀ X_i        the weight gradient [p, d], if C is given
//     n_i   = ‖dY_iᵀ X_i‖²_F        per-sample squared norms, in double
// reading each operand from an OperandSource, so that a convolution's
// patches are gathered straight from its input image while the operands are
// packed (no unfolded copy of the input is ever made).
#pragma once

#include <cstdint>
#include <string>

namespace gradnoise {

// Geometry of a convolution as 3-D (1-D and 2-D ones have unit leading
// dims). Channel ci (of one group's `channels`) of pixel (z, y, x) of a
// sample is at ci·channel_stride + ((z·in[1] + y)·in[2] + x)·pixel_stride:
// channels-first images have pixel_stride 1, channels-last ones
// channel_stride 1. Patch column c = ((a·k1 + b)·k2 + e)·channels + ci for
// tap (a, b, e) and channel ci.
struct ConvGeometry {
  int64_t channels, channel_stride, pixel_stride;
  int64_t in[3], out[3], kernel[3], stride[3], padding[3], dilation[3];
};

// Packed operands of up to this many bytes stay in the last-level cache
// while every tile of C reads them.
constexpr int64_t kDefaultScratchBytes = 8 << 20;

struct OperandSource {
  enum class Kind {
    kRows,           // element (r, c) at data[r·ld + c]
    kChannelsFirst,  // element (b·T + t, c) at data[b·ld + c·T + t]  ([B, f, T] layout)
    kPatches,        // element (b·T + t, c): column c of the patch of `conv` at
                     // output position t of the image at data[b·ld]
  };
  Kind kind;
  const void* data;
  int64_t ld;
  const ConvGeometry* conv = nullptr;
};

// C [p, d] row-major (nullptr: norms only), overwritten; norms [B] overwritten.
// in_t: float, double, c10::BFloat16 or c10::Half; acc_t: float (double for
// double input). `scratch_bytes` bounds the packed operands of one group of
// samples (the engine's main scratch memory).
template <typename in_t, typename acc_t>
void run_fused_kernel(const OperandSource& x, const OperandSource& g, int64_t B, int64_t T,
                      int64_t d, int64_t p, acc_t* C, double* norms,
                      int64_t scratch_bytes = kDefaultScratchBytes);

std::string cpu_kernel_isa();

}  // namespace gradnoise
