// The append step of attention against a KV cache: the new keys and values written into the
// caches (contiguous or paged) in place, the keys rotated first when rotary tables are given,
// and the queries rotated into a scratch tensor, all at positions cache_seqlens[b] + i. The
// decode kernel's KVCACHE specialization (flash_decode_kernels.cuh) then attends over the
// caches; run_kvcache (flash_attention_kernels.cuh) launches both.
//
// The math (reference.apply_rotary): pair j of a head, (x_a, x_b) = (x[2j], x[2j + 1]) when
// interleaved, else (x[j], x[j + D/2]), turns by the angle of table row p:
//   (x_a cos - x_b sin, x_a sin + x_b cos),  cos = rotary_cos[p, j], sin = rotary_sin[p, j],
// in fp32 with separate products (no FMA contraction, so the rounded result is the reference's
// bit for bit), rounded once to the element type. Values are copied bit for bit.
//
// One block per (sequence b, token i), i < n_tokens = max(S_new, Sq when rotating) =
// gridDim.x / B: token i < S_new writes k[b, i] (rotated) and v[b, i] into cache row
// cache_seqlens[b] + i of every kv head; token i < Sq (rotating) writes q[b, i] rotated into
// q_rot[b, i]. A thread takes one pair of one head at a time. The step moves S_new * Hkv * D
// elements (a decode step: one token), a few microseconds of the call, so it stays scalar.
//
// Preconditions (the callers check them): the AttnParams fields of a KV-cache call
// (flash_attention_common.cuh), unit stride along D everywhere, positions within the caches and
// the tables, table entries of the new rows naming blocks of the pool.
#pragma once

#include "flash_attention_common.cuh"

namespace llama_kernels {
namespace attention {

constexpr int kAppendThreads = 128;

__device__ __forceinline__ float element_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float element_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T float_to_element(float x);
template <>
__device__ __forceinline__ __half float_to_element<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 float_to_element<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The (heads, D) rows at src (heads src_head apart) to dst (dst_head apart), rotated by the
// table rows cos, sin when ROTATE, else copied; a thread per pair of one head.
template <typename T, int D, bool ROTATE>
__device__ __forceinline__ void append_heads(T* dst, int64_t dst_head, const T* src,
                                             int64_t src_head, int heads, const float* cos,
                                             const float* sin, bool interleaved) {
  constexpr int HALF = D / 2;
  for (int u = threadIdx.x; u < heads * HALF; u += kAppendThreads) {
    const int h = u / HALF, j = u % HALF;
    const int ia = interleaved ? 2 * j : j, ib = interleaved ? 2 * j + 1 : j + HALF;
    const T* x = src + h * src_head;
    T* y = dst + h * dst_head;
    if constexpr (ROTATE) {
      const float a = element_to_float(x[ia]), b = element_to_float(x[ib]);
      const float c = cos[j], s = sin[j];
      y[ia] = float_to_element<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
      y[ib] = float_to_element<T>(__fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c)));
    } else {
      y[ia] = x[ia];
      y[ib] = x[ib];
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kAppendThreads) kvcache_append_kernel(const AttnParams p) {
  const int n_tokens = gridDim.x / p.batch;
  const int b = blockIdx.x / n_tokens, i = blockIdx.x % n_tokens;
  const int pos = p.cache_seqlens[b] + i;
  const bool rotary = p.rotary_cos != nullptr;
  const float* cos = rotary ? p.rotary_cos + pos * p.rotary_stride : nullptr;
  const float* sin = rotary ? p.rotary_sin + pos * p.rotary_stride : nullptr;
  if (i < p.seqlen_new) {
    int64_t k_at = int64_t(b) * p.k_s.batch + int64_t(pos) * p.k_s.row;
    int64_t v_at = int64_t(b) * p.v_s.batch + int64_t(pos) * p.v_s.row;
    if (p.block_table != nullptr) {
      const int64_t block = p.block_table[b * p.block_table_stride + (pos >> p.page_shift)];
      const int64_t row = pos & ((1 << p.page_shift) - 1);
      k_at = block * p.k_s.batch + row * p.k_s.row;
      v_at = block * p.v_s.batch + row * p.v_s.row;
    }
    T* k_row = static_cast<T*>(p.k_cache) + k_at;
    T* v_row = static_cast<T*>(p.v_cache) + v_at;
    const T* k_new = static_cast<const T*>(p.k_new) + b * p.k_new_s.batch + i * p.k_new_s.row;
    const T* v_new = static_cast<const T*>(p.v_new) + b * p.v_new_s.batch + i * p.v_new_s.row;
    if (rotary) {
      append_heads<T, D, true>(k_row, p.k_s.head, k_new, p.k_new_s.head, p.heads_kv, cos, sin,
                               p.rotary_interleaved);
    } else {
      append_heads<T, D, false>(k_row, p.k_s.head, k_new, p.k_new_s.head, p.heads_kv, cos, sin,
                                false);
    }
    append_heads<T, D, false>(v_row, p.v_s.head, v_new, p.v_new_s.head, p.heads_kv, cos, sin,
                              false);
  }
  if (rotary && i < p.seqlen_q) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_s.batch + i * p.q_s.row;
    T* q_rot = static_cast<T*>(p.q_rot) + b * p.q_rot_s.batch + i * p.q_rot_s.row;
    append_heads<T, D, true>(q_rot, p.q_rot_s.head, q, p.q_s.head, p.heads_q, cos, sin,
                             p.rotary_interleaved);
  }
}

}  // namespace attention
}  // namespace llama_kernels
