// The softmax / loss / gradient pass of the fused linear cross entropy, over one chunk of rows
// whose logits z = x W^T the host has computed (llama_kernels/cuda_cross_entropy.py walks the
// chunks; the Triton twin is _ce_chunk_kernel in llama_kernels/triton/cross_entropy.py).
// Per row i (t_i its target, c_i its scale: 1/count for "mean", 1 for "sum", grad_output_i for
// "none"):
//   lse_i  = log sum_v exp(z_iv)                 (online: running max m, running sum s)
//   loss_i = lse_i - z_i[t_i]                    (0 where t_i == ignore_index, NaN where t_i is
//                                                 outside [0, vocab): no read out of bounds)
//   dz_i   = (softmax(z_i) - onehot(t_i)) * c_i  (write_grad: in place of z_i, rounded once to
//                                                 the logits' dtype; 0 where ignored)
// fp32 math on the logits as stored (rounded to x's dtype by the matmul, as eager's F.linear);
// the loss is fp32. Logits are a (rows, vocab) view with unit stride along vocab and any row
// stride. Kernel, launch settings and the launch path (run_cross_entropy_chunk), torch-free:
// cross_entropy.cu adds the torch side and CUDA launches;
// tests/cuda_emulator/cross_entropy_emu.cpp compiles the same code with g++ against
// tests/cuda_emulator/emulator.h.
#pragma once

#include "device_common.cuh"

#include <math.h>

namespace llama_kernels {
// Internal linkage: each translation unit that includes this header (cross_entropy.cu, the
// emulator's cross_entropy_emu.cpp) gets its own kernels, and the constants below may share
// names with those of the other kernel headers.
namespace {

// ------------------------------------------------------------------------------ settings

// One block per row. Each thread keeps its own running (max, sum) over the vectors it owns, so
// the row is walked once for the loss with a single block reduction at the end (not two per
// vocabulary block). A thread takes kItems vectors per step: 2 x 16 bytes in flight per thread,
// 64 KiB per SM at 2048 resident threads, above the ~25 KiB an SM needs in flight to keep an
// H100's HBM busy; one extra exp per step (the rescale of the running sum) over 16 logits of a
// 16-bit type. 256 threads: a 32000-logit row is 8 steps of a block, a 128256-logit row 32.
// Rows shorter than a block's step get fewer threads (a multiple of 32, for the reductions).
constexpr int kMaxThreads = 256;
constexpr int kItems = 2;

struct CrossEntropyLaunch {
  int vec;         // elements per access: 16 B worth, or 1 on the scalar path
  int threads;     // blockDim.x
  int64_t blocks;  // gridDim.x: one per row
};

// 16-byte accesses when every row of the logits starts 16-byte aligned and vocab is a whole
// number of vectors, else scalar.
constexpr CrossEntropyLaunch cross_entropy_launch_settings(int64_t rows, int64_t vocab,
                                                           int elem_size, bool aligned) {
  const int vec = aligned && vocab % (16 / elem_size) == 0 ? 16 / elem_size : 1;
  const int64_t steps = cdiv(cdiv(vocab, vec), kItems);  // threads that one step would fill
  const int64_t threads = cdiv(steps, kWarp) * kWarp;
  return CrossEntropyLaunch{vec, static_cast<int>(threads < kMaxThreads ? threads : kMaxThreads),
                            rows};
}
static_assert(cross_entropy_launch_settings(8192, 32000, 2, true).vec == 8 &&
              cross_entropy_launch_settings(8192, 32000, 2, true).threads == 256 &&
              cross_entropy_launch_settings(8192, 32000, 2, true).blocks == 8192);
static_assert(cross_entropy_launch_settings(1024, 128256, 4, true).vec == 4 &&
              cross_entropy_launch_settings(1024, 128256, 4, true).threads == 256);
static_assert(cross_entropy_launch_settings(3, 300, 2, true).vec == 1 &&
              cross_entropy_launch_settings(3, 300, 2, true).threads == 160);
static_assert(cross_entropy_launch_settings(3, 40, 2, true).vec == 8 &&
              cross_entropy_launch_settings(3, 40, 2, true).threads == 32);

// ------------------------------------------------------------------------------ kernel

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ float quiet_nan() { return __uint_as_float(0x7fc00000u); }

// (m, s) <- the pair of the union of two parts, each a max m and a sum s of exp(z - m). A part
// with s == 0 holds no logit (its m may be -inf) and is skipped rather than scaled: exp(-inf -
// -inf) would be NaN.
__device__ __forceinline__ void combine_lse(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  s = (s == 0.f ? 0.f : s * __expf(m - mm)) + (s2 == 0.f ? 0.f : s2 * __expf(m2 - mm));
  m = mm;
}

// log sum exp of the row from every thread's (m, s); every thread gets it. Warp shuffles, then
// shared memory across the warps. Assumes blockDim.x % 32 == 0, blockDim.x <= 1024, every thread
// of the block calls it once.
__device__ __forceinline__ float block_logsumexp(float m, float s, float (*scratch)[32]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    combine_lse(m, s, __shfl_xor_sync(0xffffffffu, m, offset),
                __shfl_xor_sync(0xffffffffu, s, offset));
  }
  if (blockDim.x > 32) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    if (lane == 0) {
      scratch[0][warp] = m;
      scratch[1][warp] = s;
    }
    __syncthreads();
    m = lane < n_warps ? scratch[0][lane] : neg_inf();
    s = lane < n_warps ? scratch[1][lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      combine_lse(m, s, __shfl_xor_sync(0xffffffffu, m, offset),
                  __shfl_xor_sync(0xffffffffu, s, offset));
    }
  }
  return m + logf(s);
}

// One block per row (blockIdx.x). Thread x owns the vectors x, x + blockDim.x, ... of kVec
// logits, in steps of kItems vectors; the write pass visits the same vectors. z[t] is read
// before the barrier that precedes any overwrite of the row. Ignored rows skip the softmax:
// loss 0 and, with write_grad, dz = 0.
// Preconditions: blockDim.x % 32 == 0, blockDim.x <= kMaxThreads; kVec > 1 only when
// vocab % kVec == 0 and logits and its row stride are 16-byte aligned; target int64 (rows,);
// loss fp32 (rows,) contiguous; scale fp32, row i's at scale_ptr[i * stride_scale] (stride 0:
// one value for every row), read only with write_grad.
template <typename T, int kVec>
__global__ void __launch_bounds__(kMaxThreads, 1) cross_entropy_chunk_kernel(
    T* logits_ptr, const int64_t* __restrict__ target_ptr, float* __restrict__ loss_ptr,
    const float* __restrict__ scale_ptr,
    int vocab,
    int64_t stride_row, int64_t stride_scale,
    int64_t ignore_index, bool write_grad) {
  using V = Vec<T, kVec>;
  __shared__ float scratch[2][32];
  const int64_t row = blockIdx.x;
  T* z_row = logits_ptr + row * stride_row;
  const int64_t t = target_ptr[row];
  const int n_vecs = vocab / kVec;

  if (t == ignore_index) {  // uniform over the block: no barrier is skipped by some threads
    if (threadIdx.x == 0) loss_ptr[row] = 0.f;
    if (write_grad) {
      float zeros[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) zeros[j] = 0.f;
      for (int v = threadIdx.x; v < n_vecs; v += blockDim.x) {
        store_vec<T, kVec>(z_row + v * kVec, floats_to_vec<T, kVec>(zeros));
      }
    }
    return;
  }
  const bool in_range = t >= 0 && t < vocab;
  float z_t = 0.f;
  if (threadIdx.x == 0 && in_range) z_t = to_float(load_vec<T, 1>(z_row + t).v[0]);

  float m = neg_inf(), s = 0.f;
  for (int v0 = threadIdx.x; v0 < n_vecs; v0 += kItems * blockDim.x) {
    float z[kItems][kVec];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = v0 + i * blockDim.x;
      if (v < n_vecs) {
        vec_to_floats(load_vec<T, kVec>(z_row + v * kVec), z[i]);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) z[i][j] = neg_inf();
      }
    }
    float step_max = z[0][0];  // v0 < n_vecs: at least one logit of the step is real
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) step_max = fmaxf(step_max, z[i][j]);
    }
    const float m_new = fmaxf(m, step_max);
    float step_sum = 0.f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) step_sum += __expf(z[i][j] - m_new);
    }
    s = s * __expf(m - m_new) + step_sum;  // m = -inf on the first step: exp gives 0, s was 0
    m = m_new;
  }
  const float lse = block_logsumexp(m, s, scratch);
  if (threadIdx.x == 0) loss_ptr[row] = in_range ? lse - z_t : quiet_nan();
  if (!write_grad) return;

  const float c = scale_ptr[row * stride_scale];
  __syncthreads();  // thread 0 has read z[t] (a one-warp block has no barrier before this)
  for (int v0 = threadIdx.x; v0 < n_vecs; v0 += kItems * blockDim.x) {
    V zs[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = v0 + i * blockDim.x;
      if (v < n_vecs) zs[i] = load_vec<T, kVec>(z_row + v * kVec);
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int v = v0 + i * blockDim.x;
      if (v < n_vecs) {
        float dz[kVec];
        vec_to_floats(zs[i], dz);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float p = __expf(dz[j] - lse);
          dz[j] = (v * kVec + j == t ? p - 1.f : p) * c;
        }
        store_vec<T, kVec>(z_row + v * kVec, floats_to_vec<T, kVec>(dz));
      }
    }
  }
}

// ------------------------------------------------------------------------------ launch path
// Operands, in aggregate-initialization order; launch: see device_common.cuh.
struct CrossEntropyChunkParams {
  void* logits;           // (rows, vocab) elements of T, row stride stride_row, in/out
  const int64_t* target;  // (rows,)
  float* loss;            // (rows,) contiguous, out
  const float* scale;     // row i's at scale[i * stride_scale]; read only with write_grad
  int64_t rows, vocab, stride_row, stride_scale, ignore_index;
  bool write_grad;
};

// The pass over p, T the logits' dtype; returns the settings it launched (blocks 0: no rows, no
// launch). A vocabulary over 2^31 - 1 or an empty one is refused (std::invalid_argument) before
// any launch, as is a grid of more than 2^31 - 1 rows.
template <typename T, typename Launch>
CrossEntropyLaunch run_cross_entropy_chunk(const CrossEntropyChunkParams& p, Launch&& launch) {
  if (p.vocab < 1 || p.vocab > std::numeric_limits<int>::max()) {
    throw std::invalid_argument("logits: expected a vocabulary of 1 to 2^31 - 1 classes, got " +
                                std::to_string(p.vocab));
  }
  if (p.rows == 0) return CrossEntropyLaunch{};
  const bool aligned = rows_aligned16(p.logits, p.rows, p.stride_row, sizeof(T));
  const CrossEntropyLaunch s = cross_entropy_launch_settings(p.rows, p.vocab, sizeof(T), aligned);
  const dim3 grid = grid_1d(s.blocks, "logits: too many rows", p.rows);
  with_vec<T>(s.vec, [&](auto vec) {
    launch(cross_entropy_chunk_kernel<T, decltype(vec)::value>, grid, dim3(s.threads), size_t{0},
           static_cast<T*>(p.logits), p.target, p.loss, p.scale, static_cast<int>(p.vocab),
           p.stride_row, p.stride_scale, p.ignore_index, p.write_grad);
  });
  return s;
}

}  // namespace
}  // namespace llama_kernels
