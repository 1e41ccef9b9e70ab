// Rotary position embedding (the math of reference.py apply_rotary):
//   forward   each pair (a, b) at angle t: (a cos t - b sin t, a sin t + b cos t)
//   backward  the rotation by -t (R(t)^T = R(-t)): the same kernel with conjugate = true
// Pairs are (x[2i], x[2i+1]) when interleaved (Meta), else (x[i], x[i + D/2]) (GPT-NeoX / HF).
// Pair i of token (b, s) uses table row positions[b, s] (row s without positions):
// cos/sin[row, i]. fp32 math, each output rounded once; x (B, S, H, D) with unit stride along D
// and any other strides; the output is contiguous.
// Kernel, launch settings and the launch path (run_rotary), torch-free: rotary.cu adds the
// torch side and CUDA launches; tests/cuda_emulator/rotary_emu.cpp compiles the same code with
// g++ against tests/cuda_emulator/emulator.h.
#pragma once

#ifndef LLAMA_KERNELS_EMULATOR
#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT (emulator.h defines its own)
#endif

#include "device_common.cuh"

namespace llama_kernels {
// Internal linkage: each translation unit that includes this header (rotary.cu, the emulator's
// rotary_emu.cpp) gets its own kernel, and the constants below may share names with those of
// the other kernel headers.
namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxHalf = kMaxHeadDim / 2;
// At least 128 threads per block (several tokens per block when a token has little work) so an
// SM can be filled within its 32-resident-block limit; at most 256 threads per token.
constexpr int kMinBlockThreads = 128;
constexpr int kMaxThreadsPerToken = 256;
constexpr int kMaxTokensPerBlock = kMinBlockThreads / kWarp;

struct RotaryLaunch {
  int vec;                 // pairs per thread step: 16 B of x per access, or 1 (scalar path)
  int threads_per_token;   // blockDim.x
  int tokens_per_block;    // blockDim.y
  int64_t blocks;          // gridDim.x
};

// One token per block row: its table row is staged in shared memory once and serves all its
// heads. A thread step is one unit of `vec` pairs of one head, so heads * half / vec units per
// token; one thread per unit up to 256 (one step each for LLaMA's 32 heads x 128 in bf16:
// 32 x 64 / 8 = 256 units), threads stride over the rest. 16-byte accesses when x's rows and
// strides are 16-byte aligned and half is a whole number of vectors.
constexpr RotaryLaunch rotary_launch_settings(int64_t tokens, int64_t heads, int64_t head_dim,
                                              int elem_size, bool aligned) {
  const int64_t half = head_dim / 2;
  const int vec = aligned && half % (16 / elem_size) == 0 ? 16 / elem_size : 1;
  const int64_t units = heads * (half / vec);
  int64_t threads = next_pow2(units);
  threads = threads < kWarp ? kWarp : threads;
  threads = threads > kMaxThreadsPerToken ? kMaxThreadsPerToken : threads;
  const int64_t per_block = threads >= kMinBlockThreads ? 1 : kMinBlockThreads / threads;
  return RotaryLaunch{vec, static_cast<int>(threads), static_cast<int>(per_block),
                      cdiv(tokens, per_block)};
}
static_assert(rotary_launch_settings(4096, 32, 128, 2, true).vec == 8 &&
              rotary_launch_settings(4096, 32, 128, 2, true).threads_per_token == 256 &&
              rotary_launch_settings(4096, 32, 128, 2, true).blocks == 4096);
static_assert(rotary_launch_settings(10, 1, 6, 2, true).vec == 1 &&
              rotary_launch_settings(10, 1, 6, 2, true).threads_per_token == 32 &&
              rotary_launch_settings(10, 1, 6, 2, true).tokens_per_block == kMaxTokensPerBlock &&
              rotary_launch_settings(10, 1, 6, 2, true).blocks == 3);

// out = rotate(x) as above. Layout: blockDim = (threads_per_token, tokens_per_block); block row
// threadIdx.y owns token blockIdx.x * blockDim.y + threadIdx.y (token = b * seqlen + s). Its
// threads first copy the token's cos/sin row (sin negated when conjugate) into shared memory,
// so the tables are read from global memory once per (token, pair), not once per head; then
// each thread takes units u = threadIdx.x, + blockDim.x, ...: head u / (half / kVec), pairs
// p .. p + kVec - 1 with p = (u % (half / kVec)) * kVec. Non-interleaved: vectors x[p..] and
// x[half + p..]; interleaved: the 2 kVec elements x[2p .. 2p + 2 kVec).
// Preconditions: head_dim even, <= kMaxHeadDim; blockDim.y <= kMaxTokensPerBlock; half % kVec
// == 0, and kVec > 1 only when x and its batch/seq/head strides are 16-byte aligned; table rows
// (positions values or s) in [0, table_rows); out contiguous (B, S, H, D), not overlapping x.
template <typename T, int kVec, bool kInterleaved>
__global__ void __launch_bounds__(kMaxThreadsPerToken, 1) rotary_kernel(
    T* __restrict__ out_ptr, const T* __restrict__ x_ptr, const float* __restrict__ cos_ptr,
    const float* __restrict__ sin_ptr, const int64_t* __restrict__ positions_ptr,
    int64_t tokens, int64_t seqlen, int heads, int head_dim, int64_t table_rows,
    int64_t stride_x_batch, int64_t stride_x_seq, int64_t stride_x_head,
    bool conjugate) {
  __shared__ float cos_s[kMaxTokensPerBlock][kMaxHalf];
  __shared__ float sin_s[kMaxTokensPerBlock][kMaxHalf];
  const int half = head_dim / 2;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = token < tokens;
  const int64_t b = active ? token / seqlen : 0;
  const int64_t s = active ? token - b * seqlen : 0;
  if (active) {
    const int64_t row = positions_ptr != nullptr ? positions_ptr[token] : s;
    CUDA_KERNEL_ASSERT(row >= 0 && row < table_rows);
    const float* cos_row = cos_ptr + row * half;
    const float* sin_row = sin_ptr + row * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      cos_s[threadIdx.y][i] = cos_row[i];
      sin_s[threadIdx.y][i] = conjugate ? -sin_row[i] : sin_row[i];
    }
  }
  __syncthreads();
  if (!active) return;  // after the only barrier

  const int units_per_head = half / kVec;
  const int units = heads * units_per_head;
  const T* x_token = x_ptr + b * stride_x_batch + s * stride_x_seq;
  T* out_token = out_ptr + token * heads * head_dim;
  const float* cos_t = cos_s[threadIdx.y];
  const float* sin_t = sin_s[threadIdx.y];
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    const int head = u / units_per_head;
    const int p = (u - head * units_per_head) * kVec;
    const T* xh = x_token + head * stride_x_head;
    T* oh = out_token + static_cast<int64_t>(head) * head_dim;
    // This unit's 2 kVec elements as two vectors at off_a and off_b; pair k is (a[k], bb[k]).
    const int off_a = kInterleaved ? 2 * p : p;
    const int off_b = kInterleaved ? 2 * p + kVec : half + p;
    float elems[2 * kVec];  // interleaved: x[2p .. 2p + 2 kVec); else x[p ..] then x[half + p ..]
    float a[kVec], bb[kVec], oa[kVec], ob[kVec];
    {
      float va[kVec], vb[kVec];
      vec_to_floats(load_vec<T, kVec>(xh + off_a), va);
      vec_to_floats(load_vec<T, kVec>(xh + off_b), vb);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        elems[k] = va[k];
        elems[kVec + k] = vb[k];
      }
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      a[k] = kInterleaved ? elems[2 * k] : elems[k];
      bb[k] = kInterleaved ? elems[2 * k + 1] : elems[kVec + k];
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float c = cos_t[p + k], sn = sin_t[p + k];
      // No FMA contraction: the reference's separate fp32 products, so fp32 matches exactly.
      const float ra = __fsub_rn(__fmul_rn(a[k], c), __fmul_rn(bb[k], sn));
      const float rb = __fadd_rn(__fmul_rn(a[k], sn), __fmul_rn(bb[k], c));
      if constexpr (kInterleaved) {
        elems[2 * k] = ra;
        elems[2 * k + 1] = rb;
      } else {
        elems[k] = ra;
        elems[kVec + k] = rb;
      }
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      oa[k] = elems[k];
      ob[k] = elems[kVec + k];
    }
    store_vec<T, kVec>(oh + off_a, floats_to_vec<T, kVec>(oa));
    store_vec<T, kVec>(oh + off_b, floats_to_vec<T, kVec>(ob));
  }
}

// ------------------------------------------------------------------------------ launch path
// Operands, in aggregate-initialization order; launch: see device_common.cuh.
struct RotaryParams {
  void* out;                  // (batch, seqlen, heads, head_dim) contiguous, elements of T
  const void* x;              // same shape, the strides below (elements), unit stride along D
  const float* cos;           // (table_rows, head_dim / 2) contiguous
  const float* sin;           // like cos
  const int64_t* positions;   // (batch, seqlen) contiguous, or nullptr: table row s
  int64_t batch, seqlen, heads, head_dim, table_rows;
  int64_t stride_x_batch, stride_x_seq, stride_x_head;
  bool interleaved, conjugate;
};

// out for p, T its dtype; returns the settings it launched (blocks 0: empty, no launch). The
// 16-byte path needs x and out 16-byte aligned and x's batch, seq and head strides multiples of
// 16 bytes (those of size-1 dimensions are never stepped). Over 2^31 - 1 blocks: grid_1d throws.
template <typename T, typename Launch>
RotaryLaunch run_rotary(const RotaryParams& p, Launch&& launch) {
  const int64_t tokens = p.batch * p.seqlen;
  if (tokens * p.heads * p.head_dim == 0) return RotaryLaunch{};
  const int64_t vec16 = kVec16<T>;
  const bool aligned = is_aligned(p.x, 16) && (p.batch == 1 || p.stride_x_batch % vec16 == 0) &&
                       (p.seqlen == 1 || p.stride_x_seq % vec16 == 0) &&
                       (p.heads == 1 || p.stride_x_head % vec16 == 0) && is_aligned(p.out, 16);
  const RotaryLaunch s = rotary_launch_settings(tokens, p.heads, p.head_dim, sizeof(T), aligned);
  const dim3 grid = grid_1d(s.blocks, "x: too many tokens", tokens);
  auto run = [&](auto vec, auto interleaved) {
    launch(rotary_kernel<T, decltype(vec)::value, decltype(interleaved)::value>, grid,
           dim3(s.threads_per_token, s.tokens_per_block), size_t{0}, static_cast<T*>(p.out),
           static_cast<const T*>(p.x), p.cos, p.sin, p.positions, tokens, p.seqlen,
           static_cast<int>(p.heads), static_cast<int>(p.head_dim), p.table_rows,
           p.stride_x_batch, p.stride_x_seq, p.stride_x_head, p.conjugate);
  };
  with_vec<T>(s.vec, [&](auto vec) {
    if (p.interleaved) {
      run(vec, std::true_type{});
    } else {
      run(vec, std::false_type{});
    }
  });
  return s;
}

}  // namespace
}  // namespace llama_kernels
