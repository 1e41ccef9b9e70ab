// Shared pieces of every llama-kernels CUDA file: input checks, dtype dispatch, 16-byte vector
// loads, fp32 conversions and warp/block reductions.
//
// Light headers on purpose (STYLE.md rule 12): ATen/core/Tensor.h and c10/cuda instead of
// torch/all.h or ATen/cuda/CUDAContext.h, which compile about 3x slower and pull in cuBLAS.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace llama_kernels {

// ------------------------------------------------------------------------------ host checks

#define LK_CHECK_CUDA(t, name) \
  TORCH_CHECK((t).is_cuda(), name ": expected a CUDA tensor, got one on ", (t).device())

#define LK_CHECK_SAME_DEVICE(t, ref, name, ref_name)                                    \
  TORCH_CHECK((t).device() == (ref).device(), name ": expected device ", (ref).device(), \
              " (that of " ref_name "), got ", (t).device())

#define LK_CHECK_DTYPE(t, dtype, name) \
  TORCH_CHECK((t).scalar_type() == (dtype), name ": expected dtype ", (dtype), ", got ", (t).scalar_type())

#define LK_CHECK_FLOAT(t, name)                                                                 \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||              \
                  (t).scalar_type() == at::kBFloat16,                                           \
              name ": expected dtype float32, float16 or bfloat16, got ", (t).scalar_type())

#define LK_CHECK_DIM(t, n, name) \
  TORCH_CHECK((t).dim() == (n), name ": expected ", (n), " dimensions, got ", (t).sizes())

#define LK_CHECK_LAST_DIM_CONTIGUOUS(t, name) \
  TORCH_CHECK((t).stride(-1) == 1, name ": expected unit stride in the last dimension, got strides ", (t).strides())

#define LK_CHECK_CONTIGUOUS(t, name) \
  TORCH_CHECK((t).is_contiguous(), name ": expected a contiguous tensor, got strides ", (t).strides())

// ------------------------------------------------------------------------------ dtype dispatch

// Runs the body with `scalar_t` bound to float, __half or __nv_bfloat16 (CUDA's own types, so
// the intrinsics of cuda_fp16.h / cuda_bf16.h apply directly).
#define LK_DISPATCH_FLOAT(dtype, name, ...)                                                   \
  [&] {                                                                                       \
    switch (dtype) {                                                                          \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                     \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }                     \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }          \
      default: TORCH_CHECK(false, name ": unsupported dtype ", dtype);                         \
    }                                                                                         \
  }()

// ------------------------------------------------------------------------------ device helpers

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N elements of T in one aligned register bundle; with sizeof(T) * N == 16 a load or store of
// it compiles to a single 128-bit instruction (LDG.E.128 / STG.E.128).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
constexpr int kVec16 = 16 / sizeof(T);  // elements per 16-byte access: 4 fp32, 8 fp16/bf16

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* ptr) {
  return *reinterpret_cast<const Vec<T, N>*>(ptr);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(ptr) = v;
}

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Sum over the 32 lanes of a warp; every lane gets the result. Assumes a full warp.
__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. Assumes blockDim.x % 32 == 0 and
// blockDim.x <= 1024; `scratch` holds 32 floats of shared memory. Two barriers, so it may be
// called repeatedly with the same scratch.
__device__ __forceinline__ float block_reduce_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  v = warp_reduce_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : 0.f;
  return warp_reduce_sum(v);
}

inline int num_sms(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

}  // namespace llama_kernels
