// RMSNorm and residual-add + RMSNorm, forward and backward (the math of reference.py):
//   forward   y = x * rstd * w (fp32, rounded once),  rstd = 1 / sqrt(mean(x^2) + eps)
//   add       h = round(x + residual) is stored, then y = rms_norm(h) of the ROUNDED h
//   backward  dx = rstd * (g - xhat * mean(g * xhat)) [+ dh],  g = dy * w,  xhat = x * rstd
//             dw = sum over rows of dy * xhat
// Rows are 2-D (rows, dim) views with unit column stride and any row stride; outputs are
// contiguous. fp32 inside; rstd is kept in fp32 for the backward.
// Kernels and the launch path (run_rms_norm_fwd, run_rms_norm_bwd; settings in
// rms_norm_settings.cuh), torch-free:
// rms_norm.cu adds the torch side and CUDA launches; tests/cuda_emulator/rms_norm_emu.cpp
// compiles the same code with g++ against tests/cuda_emulator/emulator.h.
#pragma once

#include "device_common.cuh"
#include "rms_norm_settings.cuh"

namespace llama_kernels {
// Internal linkage: each translation unit that includes this header (rms_norm.cu, the
// emulator's rms_norm_emu.cpp) gets its own kernels, and the constants below may share names
// with those of the other kernel headers.
namespace {

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
