// RMSNorm and residual-add + RMSNorm, forward and backward (the math of reference.py):
//   forward   y = x * rstd * w (fp32, rounded once),  rstd = 1 / sqrt(mean(x^2) + eps)
//   add       h = round(x + residual) is stored, then y = rms_norm(h) of the ROUNDED h
//   backward  dx = rstd * (g - xhat * mean(g * xhat)) [+ dh],  g = dy * w,  xhat = x * rstd
//             dw = sum over rows of dy * xhat
// Rows are 2-D (rows, dim) views with unit column stride and any row stride; outputs are
// contiguous. fp32 inside; rstd is kept in fp32 for the backward.
// Kernels, launch settings and the launch path (run_rms_norm_fwd, run_rms_norm_bwd), torch-free:
// rms_norm.cu adds the torch side and CUDA launches; tests/cuda_emulator/rms_norm_emu.cpp
// compiles the same code with g++ against tests/cuda_emulator/emulator.h.
#pragma once

#include "device_common.cuh"

namespace llama_kernels {
// Internal linkage: each translation unit that includes this header (rms_norm.cu, the
// emulator's rms_norm_emu.cpp) gets its own kernels, and the constants below may share names
// with those of the other kernel headers.
namespace {

// A block holds at least this many threads: several rows of narrow widths share one block so
// that an SM (at most 32 resident blocks) can still be filled with 2048 threads.
constexpr int kMinBlockThreads = 128;
constexpr int kMaxRowsPerBlock = kMinBlockThreads / kWarp;
// Each thread aims to hold 4 vectors (64 B: 32 bf16 / 16 fp32 values) of its row: enough loads
// in flight per thread to cover memory latency, few enough registers for full occupancy.
constexpr int kTargetItems = 4;
constexpr int kMaxItems = 8;
// The scalar path (odd widths, misaligned views) may hold twice as many: its items are single
// elements, so 16 of them cost fewer registers than 8 vectors, and widths up to 8192 fit.
constexpr int kMaxScalarItems = 16;
// 512, not 1024: a 1024-thread block caps ptxas at 64 registers, and the 8-vector bucket (its
// loads of x and residual hoisted for ILP) spills there; at 512 it has 128. Rows of up to
// 512 x 8 vectors (32768 bf16, 16384 fp32) stay in registers.
constexpr int kFwdMaxThreadsPerRow = 512;
// The backward holds x, dy and fp32 dw accumulators per item, so it wants one item per thread
// and many threads: with vectors, one 16-byte vector per thread on as many threads as the row
// has vectors (up to 1024: 8192 bf16, 4096 fp32), at most 64 registers, so that an SM holds 32
// warps: the shape of the Triton backward (16 warps x 8 values at width 4096, 64 registers, two
// programs per SM: 87% of copy bandwidth on an H100, benchmarks/NOTES.md). Wider rows take 8
// vectors on 256 threads (about 200 registers) and the scalar path stays at 256 threads.
constexpr int kBwdMaxThreadsPerRow = 1024;
constexpr int kBwdWideThreadsPerRow = 256;
// Bound on the fp32 dw partials, in floats per SM (64 KB). QuACK's k x #SM partial rows for
// width N (k = 16/8/4/2/1 for N <= 256/1K/2K/4K/8K) is this rule at 4096-8192 floats; twice
// that here because our backward keeps a thread's whole share in registers (one row in flight
// per block), so it needs more resident blocks to keep loads in flight (4 at width 4096: 512
// threads per SM). The extra partial traffic is 2 x 64 KB per SM, a few % at LLaMA sizes.
constexpr int64_t kPartialFloatsPerSm = 16384;
constexpr int kReduceRows = 8;           // dw reduction block: 32 columns x 8 partial lanes

// How a row kernel is launched. items == 0 selects the wide-row path (x read twice).
struct RowLaunch {
  int vec;              // elements per access: 16 B worth, or 1 on the scalar path
  int items;            // vectors each thread keeps in registers; 0 = wide path
  int threads_per_row;  // blockDim.x
  int rows_per_block;   // blockDim.y
  int64_t blocks;       // gridDim.x
};

// A RowLaunch of `items` per thread on `threads` per row: rows narrower than kMinBlockThreads
// share a block, so that an SM (at most 32 resident blocks) can still be filled.
constexpr RowLaunch row_block(int vec, int64_t items, int64_t threads) {
  const int64_t rows_per_block = threads >= kMinBlockThreads ? 1 : kMinBlockThreads / threads;
  return RowLaunch{vec, static_cast<int>(items), static_cast<int>(threads),
                   static_cast<int>(rows_per_block), 0};
}

// Threads per row and items per thread for a row of n_vec vectors: about kTargetItems vectors
// per thread, at least one warp (a narrow row is one warp: the reduction is shuffles only), at
// most max_threads; rows that would need more than kMaxItems per thread take the wide path.
// Items come in buckets 4, 8 (and 16 on the scalar path): rows under 128 vectors leave some
// items idle rather than get their own specializations (each costs build time, and such rows
// are latency-bound anyway).
constexpr RowLaunch row_shape(int64_t dim, int vec, int max_threads) {
  const int64_t n_vec = cdiv(dim, vec);
  int64_t threads = next_pow2(cdiv(n_vec, kTargetItems));
  threads = threads < kWarp ? kWarp : (threads > max_threads ? max_threads : threads);
  int64_t items = next_pow2(cdiv(n_vec, threads));
  items = items < kTargetItems ? kTargetItems : items;
  if (items > (vec == 1 ? kMaxScalarItems : kMaxItems)) items = 0;
  return row_block(vec, items, threads);
}

// 16-byte vectors when every row starts 16-byte aligned and the width is a whole number of
// vectors, else the scalar path.
constexpr int row_vec(int64_t dim, int elem_size, bool aligned) {
  return aligned && dim % (16 / elem_size) == 0 ? 16 / elem_size : 1;
}

// Forward: one block row (threadIdx.y) per row, one row per block row, no persistent loop (each
// row is independent and short, so the hardware scheduler balances best).
constexpr RowLaunch rms_norm_fwd_launch_settings(int64_t rows, int64_t dim, int elem_size,
                                                 bool aligned) {
  RowLaunch s = row_shape(dim, row_vec(dim, elem_size, aligned), kFwdMaxThreadsPerRow);
  s.blocks = cdiv(rows, s.rows_per_block);
  return s;
}

// The launch bounds of each backward specialization: one vector per thread (kVec > 1, kItems
// == 1) runs blocks of up to 1024 threads (64 registers: ptxas fits it without spilling,
// tests/test_cuda_build.py); every other bucket at most 256 threads.
constexpr bool rms_norm_bwd_narrow(int vec, int items) { return vec > 1 && items == 1; }
constexpr int rms_norm_bwd_max_threads(int vec, int items) {
  return rms_norm_bwd_narrow(vec, items) ? kBwdMaxThreadsPerRow : kBwdWideThreadsPerRow;
}

// Backward shape: one vector per thread on a multiple of 32 threads (a power of two below 128,
// with several rows per block) when the row has at most 1024 vectors; else the shared shape on
// up to 256 threads (8 vectors, the scalar buckets, the wide path).
constexpr RowLaunch rms_norm_bwd_shape(int64_t dim, int vec) {
  const int64_t n_vec = cdiv(dim, vec);
  if (vec > 1 && n_vec <= kBwdMaxThreadsPerRow) {
    int64_t threads = cdiv(n_vec, kWarp) * kWarp;
    if (threads < kMinBlockThreads) threads = next_pow2(threads);
    return row_block(vec, 1, threads);
  }
  return row_shape(dim, vec, kBwdWideThreadsPerRow);
}

// Backward: persistent blocks striding over rows, so that each (block, row slot) sums its share
// of dw in registers and writes one fp32 partial row. Grid: no more blocks than are resident at
// once (resident_blocks_per_sm(shape) is the kernel's occupancy, which its register use
// decides), so all run in one wave and share the rows evenly; and few enough slots that the
// partials stay within kPartialFloatsPerSm per SM (pure overhead traffic beyond that).
template <typename Occupancy>
constexpr RowLaunch rms_norm_bwd_launch_settings(int64_t rows, int64_t dim, int elem_size,
                                                 bool aligned, int num_sms,
                                                 Occupancy&& resident_blocks_per_sm) {
  RowLaunch s = rms_norm_bwd_shape(dim, row_vec(dim, elem_size, aligned));
  int64_t resident = resident_blocks_per_sm(s);
  resident = resident < 1 ? 1 : resident;
  int64_t per_sm = kPartialFloatsPerSm / (dim * s.rows_per_block);
  per_sm = per_sm < 1 ? 1 : (per_sm > resident ? resident : per_sm);
  const int64_t row_groups = cdiv(rows, s.rows_per_block);
  s.blocks = row_groups < per_sm * num_sms ? row_groups : per_sm * num_sms;
  return s;
}

// ------------------------------------------------------------------ compile-time self-test
// The settings functions are constexpr so their invariants are proven here, at build time (a
// broken heuristic fails the build), for the widths where buckets change and the LLaMA widths.
constexpr bool row_launch_ok(const RowLaunch& s, int64_t dim, int max_threads) {
  const bool items_ok = s.items == 0 || s.items == 4 || s.items == 8 ||
                        (s.items == 16 && s.vec == 1) ||
                        (s.items == 1 && s.vec > 1 && max_threads == kBwdMaxThreadsPerRow);
  const bool covers = s.items == 0 || int64_t{s.items} * s.threads_per_row * s.vec >= dim;
  return items_ok && covers && s.threads_per_row % kWarp == 0 &&
         s.threads_per_row <= max_threads && s.rows_per_block >= 1 &&
         s.rows_per_block <= kMaxRowsPerBlock &&
         s.threads_per_row * s.rows_per_block <=
             (max_threads > kMinBlockThreads ? max_threads : kMinBlockThreads) &&
         (s.vec == 1 || dim % s.vec == 0) && s.blocks >= 1;
}

constexpr bool rms_norm_settings_self_test() {
  for (int64_t dim : {1, 2, 3, 7, 8, 9, 31, 32, 33, 123, 127, 128, 129, 255, 256, 257, 511, 512,
                      513, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097, 5120, 6656, 8191,
                      8192, 8193, 11008, 16383, 16384, 16385, 32768, 32769, 65535, 65536, 65537}) {
    for (int elem_size : {2, 4}) {
      for (bool aligned : {false, true}) {
        for (int64_t rows : {int64_t{1}, int64_t{3}, int64_t{100000}}) {
          const RowLaunch f = rms_norm_fwd_launch_settings(rows, dim, elem_size, aligned);
          const RowLaunch b = rms_norm_bwd_launch_settings(
              rows, dim, elem_size, aligned, 132, [](const RowLaunch& shape) {
                return kMaxThreadsPerSm / (shape.threads_per_row * shape.rows_per_block);
              });
          if (!row_launch_ok(f, dim, kFwdMaxThreadsPerRow)) return false;
          if (!row_launch_ok(b, dim, kBwdMaxThreadsPerRow)) return false;
          // a block never exceeds the launch bounds of the kernel it runs
          if (b.threads_per_row * b.rows_per_block > rms_norm_bwd_max_threads(b.vec, b.items))
            return false;
          if (f.blocks * f.rows_per_block < rows) return false;
          if (b.blocks > cdiv(rows, b.rows_per_block)) return false;
          // Rows up to 8192 wide stay in registers (one read of x).
          if (dim <= 8192 && f.items == 0) return false;
        }
      }
    }
  }
  return true;
}
#ifndef __CUDA_ARCH__  // host passes only: the device passes would re-evaluate it per arch
static_assert(rms_norm_settings_self_test(), "rms_norm launch settings broke an invariant");
#endif
// LLaMA-7B width in bf16: 128 threads x 4 vectors of 8 (QuACK's 4096 config holds 2x as many).
static_assert(rms_norm_fwd_launch_settings(1, 4096, 2, true).threads_per_row == 128 &&
              rms_norm_fwd_launch_settings(1, 4096, 2, true).items == 4);
// Backward at the LLaMA widths: one vector per thread; 16384 bf16 is 256 threads x 8.
static_assert(rms_norm_bwd_shape(4096, 8).threads_per_row == 512 &&
              rms_norm_bwd_shape(4096, 8).items == 1);
static_assert(rms_norm_bwd_shape(6656, 8).threads_per_row == 832 &&
              rms_norm_bwd_shape(8192, 8).threads_per_row == 1024 &&
              rms_norm_bwd_shape(4096, 4).threads_per_row == 1024);
static_assert(rms_norm_bwd_shape(16384, 8).threads_per_row == 256 &&
              rms_norm_bwd_shape(16384, 8).items == 8);
static_assert(rms_norm_bwd_shape(256, 8).threads_per_row == 32 &&
              rms_norm_bwd_shape(256, 8).rows_per_block == 4);
// Odd width 123 takes the scalar path: one warp, 4 values per lane, 4 rows per block.
static_assert(rms_norm_fwd_launch_settings(1, 123, 2, true).vec == 1 &&
              rms_norm_fwd_launch_settings(1, 123, 2, true).threads_per_row == 32 &&
              rms_norm_fwd_launch_settings(1, 123, 2, true).rows_per_block == 4);
// fp32 at 65536 is wider than 512 threads x 8 vectors: the wide path.
static_assert(rms_norm_fwd_launch_settings(1, 65536, 4, true).items == 0);

// The inv_dim argument of both row kernels: 1 / dim, computed on the host because an IEEE
// division in the kernel compiles to a subroutine call whose calling convention spills
// registers (seen on sm_90 in ptxas -v).
inline float inv_dim(int64_t dim) {
  return static_cast<float>(1.0 / static_cast<double>(dim));
}

// ------------------------------------------------------------------------------ kernels

// fp32 copy of one vector: the form in which the forward keeps its row in registers.
template <int kVec>
struct Floats { float v[kVec]; };

// Loads one vector of the row to normalize: x itself, or h = round(x + residual) (fp32 add),
// which is also stored to h_out unless that is null. Rounding before the norm is the contract
// (reference.py); the fp32 value returned is exactly the rounded h.
template <typename T, int kVec>
__device__ __forceinline__ Floats<kVec> load_row_input(const T* x, const T* residual, T* h_out) {
  Floats<kVec> f;
  vec_to_floats(load_vec<T, kVec>(x), f.v);
  if (residual != nullptr) {
    float r[kVec];
    vec_to_floats(load_vec<T, kVec>(residual), r);
#pragma unroll
    for (int j = 0; j < kVec; ++j) f.v[j] += r[j];
    const Vec<T, kVec> h = floats_to_vec<T, kVec>(f.v);
    if (h_out != nullptr) store_vec<T, kVec>(h_out, h);
    vec_to_floats(h, f.v);
  }
  return f;
}

template <int kVec>
__device__ __forceinline__ float sum_squares(const Floats<kVec>& f) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < kVec; ++j) s += f.v[j] * f.v[j];
  return s;
}

template <typename T, int kVec>
__device__ __forceinline__ void store_normalized(T* y, const Floats<kVec>& f, const T* weight,
                                                 float rstd) {
  float w[kVec], out[kVec];
  vec_to_floats(load_vec<T, kVec>(weight), w);
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = f.v[j] * rstd * w[j];
  store_vec<T, kVec>(y, floats_to_vec<T, kVec>(out));
}

// Forward, optionally with the residual add (residual_ptr != nullptr; then h_ptr is written).
//   y = x * rstd * w,  rstd = rsqrt(sum(x^2) / dim + eps)   [x := round(x + residual)]
// Layout: blockDim = (threads_per_row, rows_per_block); block row threadIdx.y owns row
// blockIdx.x * blockDim.y + threadIdx.y. Thread x owns the vectors x, x + blockDim.x, ... of
// kVec elements. With kItems > 0 it keeps its kItems vectors in registers from the load to the
// write (x read once); kItems == 0 is the wide-row path, which reads x (and residual) twice.
// Preconditions: blockDim.x % 32 == 0, blockDim.y <= kMaxRowsPerBlock; kVec > 1 only when
// dim % kVec == 0 and x, residual, weight, y, h and their row strides are 16-byte aligned;
// kItems == 0 or kItems * kVec * blockDim.x >= dim; y and h contiguous (row stride dim) and
// not overlapping the inputs.
template <typename T, int kVec, int kItems>
__global__ void __launch_bounds__(kFwdMaxThreadsPerRow, 1) rms_norm_fwd_kernel(
    T* __restrict__ y_ptr, T* h_ptr, float* __restrict__ rstd_ptr, const T* __restrict__ x_ptr,
    const T* __restrict__ residual_ptr, const T* __restrict__ weight_ptr,
    int64_t rows, int dim,
    int64_t stride_x_row, int64_t stride_residual_row,
    float inv_dim, float eps) {
  __shared__ float scratch[kMaxRowsPerBlock][32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < rows;
  const int64_t r = active ? row : 0;  // keeps every address in bounds for idle block rows
  const T* x_row = x_ptr + r * stride_x_row;
  const T* res_row = residual_ptr == nullptr ? nullptr : residual_ptr + r * stride_residual_row;
  T* h_row = h_ptr == nullptr ? nullptr : h_ptr + r * dim;
  T* y_row = y_ptr + r * dim;

  float sum_sq = 0.f;
  Floats<kVec> vals[kItems > 0 ? kItems : 1];
  if constexpr (kItems > 0) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = (threadIdx.x + i * blockDim.x) * kVec;
      if (active && col < dim) {
        vals[i] = load_row_input<T, kVec>(x_row + col, res_row ? res_row + col : nullptr,
                                          h_row ? h_row + col : nullptr);
        sum_sq += sum_squares<kVec>(vals[i]);
      }
    }
  } else if (active) {
    for (int col = threadIdx.x * kVec; col < dim; col += blockDim.x * kVec) {
      sum_sq += sum_squares<kVec>(load_row_input<T, kVec>(
          x_row + col, res_row ? res_row + col : nullptr, h_row ? h_row + col : nullptr));
    }
  }
  const float rstd = rsqrtf(row_reduce_sum(sum_sq, scratch) * inv_dim + eps);
  if (!active) return;  // after the block's last barrier
  if (threadIdx.x == 0) rstd_ptr[row] = rstd;

  if constexpr (kItems > 0) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = (threadIdx.x + i * blockDim.x) * kVec;
      if (col < dim) store_normalized<T, kVec>(y_row + col, vals[i], weight_ptr + col, rstd);
    }
  } else {
    // Second read of x (and residual: h is recomputed, bit for bit, rather than read back from
    // h_ptr, because the compiler turns that read into a non-coherent LDG.CONSTANT, which is
    // only valid for memory the kernel does not write).
    for (int col = threadIdx.x * kVec; col < dim; col += blockDim.x * kVec) {
      store_normalized<T, kVec>(
          y_row + col,
          load_row_input<T, kVec>(x_row + col, res_row ? res_row + col : nullptr, nullptr),
          weight_ptr + col, rstd);
    }
  }
}

// Backward. For each row: dot = sum(g * xhat) / dim, dx = rstd * (g - xhat * dot) [+ dh],
// g = dy * w, xhat = x * rstd (reference.py's order of operations), rounded once.
// dw: block row threadIdx.y of block b is slot s = b * blockDim.y + threadIdx.y; it accumulates
// dy * xhat over its rows (row groups b, b + gridDim.x, ...) in fp32 for the columns its
// threads own, and writes dw_partial[s, :] (every slot writes every column, zeros if it saw no
// row); rms_norm_dw_kernel sums the slots in a fixed order: deterministic, no atomics.
// With kItems > 0 x and dy stay in registers between the reduction and dx, and the dw sums stay
// in registers across rows; kItems == 0 (wide rows) reads x and dy twice and accumulates dw in
// its own slot of dw_partial (each column owned by one thread, so plain read-modify-write).
// Preconditions: those of rms_norm_fwd_kernel, with dy, x, dh for x, residual; rstd (rows,)
// fp32; dw_partial (gridDim.x * blockDim.y, dim) fp32; blockDim.x * blockDim.y <=
// rms_norm_bwd_max_threads(kVec, kItems); blockDim.x a multiple of 32.
template <typename T, int kVec, int kItems>
__global__ void __launch_bounds__(rms_norm_bwd_max_threads(kVec, kItems), 1) rms_norm_bwd_kernel(
    T* __restrict__ dx_ptr, float* dw_partial_ptr, const T* __restrict__ dy_ptr,
    const T* __restrict__ x_ptr, const T* __restrict__ weight_ptr,
    const float* __restrict__ rstd_ptr, const T* __restrict__ dh_ptr,
    int64_t rows, int dim,
    int64_t stride_dy_row, int64_t stride_x_row, int64_t stride_dh_row,
    float inv_dim) {
  using V = Vec<T, kVec>;
  __shared__ float scratch[kMaxRowsPerBlock][32];
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  float* partial = dw_partial_ptr + slot * dim;

  // dy, x (and dh) -> one vector of dx; returns dy * xhat through dw. Element by element from
  // the packed vectors, so that few fp32 copies are live at once.
  auto dx_vec = [&](T* dx, const V& dyv, const V& xv, bool has_dh, const V& dhv, const V& wv,
                    float rstd, float mean_dot, float* dw) {
    float out[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float dy = to_float(dyv.v[j]);
      const float xhat = to_float(xv.v[j]) * rstd;
      out[j] = rstd * (dy * to_float(wv.v[j]) - xhat * mean_dot);
      if (has_dh) out[j] += to_float(dhv.v[j]);
      dw[j] = dy * xhat;
    }
    store_vec<T, kVec>(dx, floats_to_vec<T, kVec>(out));
  };
  auto dot_vec = [&](const V& dyv, const V& xv, const V& wv, float rstd) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      s += (to_float(dyv.v[j]) * to_float(wv.v[j])) * (to_float(xv.v[j]) * rstd);
    }
    return s;
  };

  // One vector per thread: the row's weight stays in registers for all the rows of the block;
  // the larger buckets reload it (L1 hits) where registers are short.
  constexpr bool kHoldWeight = rms_norm_bwd_narrow(kVec, kItems);
  V w_held[kHoldWeight ? kItems : 1];
  if constexpr (kHoldWeight) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = (threadIdx.x + i * blockDim.x) * kVec;
      if (col < dim) w_held[i] = load_vec<T, kVec>(weight_ptr + col);
    }
  }
  auto weight_at = [&](int i, int col) -> V {
    if constexpr (kHoldWeight) {
      return w_held[i];
    } else {
      return load_vec<T, kVec>(weight_ptr + col);
    }
  };

  float dw_acc[kItems > 0 ? kItems : 1][kVec];
#pragma unroll
  for (int i = 0; i < (kItems > 0 ? kItems : 1); ++i) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) dw_acc[i][j] = 0.f;
  }
  if constexpr (kItems == 0) {
    for (int col = threadIdx.x * kVec; col < dim; col += blockDim.x * kVec) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) partial[col + j] = 0.f;
    }
  }

  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows;
       base += rows_per_step) {  // uniform over the block: every thread meets every barrier
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    const int64_t r = active ? row : 0;
    const T* dy_row = dy_ptr + r * stride_dy_row;
    const T* x_row = x_ptr + r * stride_x_row;
    const T* dh_row = dh_ptr == nullptr ? nullptr : dh_ptr + r * stride_dh_row;
    T* dx_row = dx_ptr + r * dim;
    const float rstd = active ? rstd_ptr[r] : 0.f;

    float dot = 0.f;
    if constexpr (kItems > 0) {
      V xs[kItems], dys[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int col = (threadIdx.x + i * blockDim.x) * kVec;
        if (active && col < dim) {
          dys[i] = load_vec<T, kVec>(dy_row + col);
          xs[i] = load_vec<T, kVec>(x_row + col);
          dot += dot_vec(dys[i], xs[i], weight_at(i, col), rstd);
        }
      }
      const float mean_dot = row_reduce_sum(dot, scratch) * inv_dim;
      if (active) {
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          opaque(dys[i]);
          opaque(xs[i]);
          const int col = (threadIdx.x + i * blockDim.x) * kVec;
          if (col < dim) {
            float dw[kVec];
            const V dhv = dh_row ? load_vec<T, kVec>(dh_row + col) : dys[i];
            dx_vec(dx_row + col, dys[i], xs[i], dh_row != nullptr, dhv, weight_at(i, col), rstd,
                   mean_dot, dw);
#pragma unroll
            for (int j = 0; j < kVec; ++j) dw_acc[i][j] += dw[j];
          }
        }
      }
    } else {
      if (active) {
        for (int col = threadIdx.x * kVec; col < dim; col += blockDim.x * kVec) {
          dot += dot_vec(load_vec<T, kVec>(dy_row + col), load_vec<T, kVec>(x_row + col),
                         load_vec<T, kVec>(weight_ptr + col), rstd);
        }
      }
      const float mean_dot = row_reduce_sum(dot, scratch) * inv_dim;
      if (active) {
        for (int col = threadIdx.x * kVec; col < dim; col += blockDim.x * kVec) {
          float dw[kVec];
          const V dyv = load_vec<T, kVec>(dy_row + col);
          const V dhv = dh_row ? load_vec<T, kVec>(dh_row + col) : dyv;
          dx_vec(dx_row + col, dyv, load_vec<T, kVec>(x_row + col), dh_row != nullptr, dhv,
                 load_vec<T, kVec>(weight_ptr + col), rstd, mean_dot, dw);
#pragma unroll
          for (int j = 0; j < kVec; ++j) partial[col + j] += dw[j];
        }
      }
    }
  }

  if constexpr (kItems > 0) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int col = (threadIdx.x + i * blockDim.x) * kVec;
      if (col < dim) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) partial[col + j] = dw_acc[i][j];
      }
    }
  }
}

// dw[c] = sum over p of dw_partial[p, c], summed in a fixed order (lane threadIdx.y takes
// p = threadIdx.y, threadIdx.y + kReduceRows, ...; then lane 0 adds the lanes in order), so
// the result is bitwise reproducible; fp32, rounded once to T.
// Layout: blockDim = (32, kReduceRows), 32 columns per block (coalesced 128-byte rows).
template <typename T>
__global__ void __launch_bounds__(32 * kReduceRows, 1) rms_norm_dw_kernel(
    T* __restrict__ dw_ptr, const float* __restrict__ dw_partial_ptr,
    int64_t n_partials, int dim) {
  __shared__ float lane_sums[kReduceRows][32];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float acc = 0.f;
  if (col < dim) {
    for (int64_t p = threadIdx.y; p < n_partials; p += kReduceRows) {
      acc += dw_partial_ptr[p * dim + col];
    }
  }
  lane_sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < dim) {
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < kReduceRows; ++k) total += lane_sums[k][threadIdx.x];
    dw_ptr[col] = from_float<T>(total);
  }
}

// Host side: calls f(integral_constant<kVec>, integral_constant<kItems>) for the settings'
// specialization. kNarrowItems: the backward's one-vector bucket exists (instantiated for the
// backward only).
template <typename T, bool kNarrowItems = false, typename F>
void with_row_specialization(const RowLaunch& s, F&& f) {
  with_vec<T>(s.vec, [&](auto vec) {
    constexpr bool kNarrow = kNarrowItems && decltype(vec)::value > 1;
    switch (s.items) {
      case 0: return f(vec, std::integral_constant<int, 0>{});
      case 1:
        if constexpr (kNarrow) return f(vec, std::integral_constant<int, 1>{});
        break;
      case 4:  // the backward's vector rows take 1 or 8 vectors, never 4
        if constexpr (!kNarrow) return f(vec, std::integral_constant<int, 4>{});
        break;
      case 8: return f(vec, std::integral_constant<int, 8>{});
      case 16:
        if constexpr (decltype(vec)::value == 1) return f(vec, std::integral_constant<int, 16>{});
        break;
      default:
        break;
    }
    throw std::logic_error("rms_norm: internal error, no kernel for " +
                           std::to_string(s.items) + " items of " + std::to_string(s.vec));
  });
}

// ------------------------------------------------------------------------------ launch path
// Operands in aggregate-initialization order: pointers to elements of the run's T (outputs and
// weight contiguous), row strides in elements; residual and dh may be nullptr (h is then unused).
// launch: see device_common.cuh.
struct RmsNormFwdParams {
  void* y;  // (rows, dim)
  void* h;  // (rows, dim): round(x + residual)
  float* rstd;
  const void *x, *residual, *weight;
  int64_t rows, dim, stride_x_row, stride_residual_row;
  float eps;
};
// dw_partial: fp32 scratch of (rms_norm_bwd_partial_rows(s), dim), any contents, which the
// caller allocates between rms_norm_bwd_settings and run_rms_norm_bwd.
struct RmsNormBwdParams {
  void *dx, *dweight;
  float* dw_partial;
  const void *dy, *x, *weight;
  const float* rstd;  // the forward's
  const void* dh;     // gradient reaching h (add_rms_norm's residual stream)
  int64_t rows, dim, stride_dy_row, stride_x_row, stride_dh_row;
};

// y (and h), rstd for p, T its dtype; returns the settings it launched (blocks 0: no rows, no
// launch). The 16-byte path needs every row of every operand 16-byte aligned (and row_vec adds
// dim % vec == 0). Over 2^31 - 1 blocks: grid_1d throws.
template <typename T, typename Launch>
RowLaunch run_rms_norm_fwd(const RmsNormFwdParams& p, Launch&& launch) {
  if (p.rows == 0) return RowLaunch{};
  const bool has_residual = p.residual != nullptr;
  const bool aligned = rows_aligned16({{p.x, p.stride_x_row}, {p.residual, p.stride_residual_row},
                                       {p.weight, 0}, {p.y, p.dim},
                                       {has_residual ? p.h : nullptr, p.dim}},
                                      p.rows, sizeof(T));
  const RowLaunch s = rms_norm_fwd_launch_settings(p.rows, p.dim, sizeof(T), aligned);
  const dim3 grid = grid_1d(s.blocks, "x: too many rows", p.rows);
  with_row_specialization<T>(s, [&](auto vec, auto items) {
    launch(rms_norm_fwd_kernel<T, decltype(vec)::value, decltype(items)::value>, grid,
           dim3(s.threads_per_row, s.rows_per_block), size_t{0}, static_cast<T*>(p.y),
           has_residual ? static_cast<T*>(p.h) : nullptr, p.rstd, static_cast<const T*>(p.x),
           static_cast<const T*>(p.residual), static_cast<const T*>(p.weight), p.rows,
           static_cast<int>(p.dim), p.stride_x_row,
           has_residual ? p.stride_residual_row : int64_t{0}, inv_dim(p.dim), p.eps);
  });
  return s;
}

// The backward's settings for p: the 16-byte path when every row of every operand is 16-byte
// aligned; occupancy(kernel, block_threads, dynamic_smem_bytes) answers the resident blocks per
// SM of the specialization each candidate shape would run.
template <typename T, typename Occupancy>
RowLaunch rms_norm_bwd_settings(const RmsNormBwdParams& p, int num_sms, Occupancy&& occupancy) {
  const int es = sizeof(T);
  const bool aligned = rows_aligned16({{p.x, p.stride_x_row}, {p.dy, p.stride_dy_row},
                                       {p.dh, p.stride_dh_row}, {p.weight, 0}, {p.dx, p.dim}},
                                      p.rows, es);
  return rms_norm_bwd_launch_settings(p.rows, p.dim, es, aligned, num_sms, [&](const RowLaunch& b) {
    int resident = 0;
    with_row_specialization<T, true>(b, [&](auto vec, auto items) {
      resident = occupancy(rms_norm_bwd_kernel<T, decltype(vec)::value, decltype(items)::value>,
                           b.threads_per_row * b.rows_per_block, size_t{0});
    });
    return resident;
  });
}

// Rows of p.dw_partial that the backward under settings s writes: one per (block, block row).
constexpr int64_t rms_norm_bwd_partial_rows(const RowLaunch& s) {
  return s.blocks * s.rows_per_block;
}

// dx and dweight for p under s = rms_norm_bwd_settings<T>(p, ...): the backward kernel writes
// the partials, rms_norm_dw_kernel sums them. Without rows only the sum runs: dweight = 0.
template <typename T, typename Launch>
void run_rms_norm_bwd(const RmsNormBwdParams& p, const RowLaunch& s, Launch&& launch) {
  if (p.rows > 0) {
    with_row_specialization<T, true>(s, [&](auto vec, auto items) {
      launch(rms_norm_bwd_kernel<T, decltype(vec)::value, decltype(items)::value>,
             dim3(static_cast<unsigned>(s.blocks)), dim3(s.threads_per_row, s.rows_per_block),
             size_t{0}, static_cast<T*>(p.dx), p.dw_partial, static_cast<const T*>(p.dy),
             static_cast<const T*>(p.x), static_cast<const T*>(p.weight), p.rstd,
             static_cast<const T*>(p.dh), p.rows, static_cast<int>(p.dim), p.stride_dy_row,
             p.stride_x_row, p.dh != nullptr ? p.stride_dh_row : int64_t{0}, inv_dim(p.dim));
    });
  }
  launch(rms_norm_dw_kernel<T>, dim3(static_cast<unsigned>(cdiv(p.dim, 32))),
         dim3(32, kReduceRows), size_t{0}, static_cast<T*>(p.dweight),
         static_cast<const float*>(p.dw_partial), rms_norm_bwd_partial_rows(s),
         static_cast<int>(p.dim));
}

}  // namespace
}  // namespace llama_kernels
