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

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

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

constexpr int kWarp = 32;
constexpr int kMaxThreadsPerSm = 2048;  // resident threads per SM on sm_80 and sm_90

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// fp32 <-> vector conversions, two 16-bit lanes at a time for fp16/bf16 (one F2FP pack per pair
// on sm_80+): converting lane by lane left ptxas building 128-bit stores from single 16-bit
// registers and spilling them. Round to nearest even, as from_float.
template <typename T>
struct Pair;  // the two-lane type of T
template <>
struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(type p) { return __half22float2(p); }
  static __device__ __forceinline__ type from_floats(float a, float b) {
    return __floats2half2_rn(a, b);
  }
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(type p) { return __bfloat1622float2(p); }
  static __device__ __forceinline__ type from_floats(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
};

template <typename T, int N>
__device__ __forceinline__ void vec_to_floats(const Vec<T, N>& v, float (&f)[N]) {
  if constexpr (sizeof(T) == 2 && N % 2 == 0) {
    using P = Pair<T>;
    const auto* p = reinterpret_cast<const typename P::type*>(v.v);
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      const float2 f2 = P::to_float2(p[k]);
      f[2 * k] = f2.x;
      f[2 * k + 1] = f2.y;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) f[k] = to_float(v.v[k]);
  }
}

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> floats_to_vec(const float (&f)[N]) {
  Vec<T, N> v;
  if constexpr (sizeof(T) == 2 && N % 2 == 0) {
    using P = Pair<T>;
    auto* p = reinterpret_cast<typename P::type*>(v.v);
#pragma unroll
    for (int k = 0; k < N / 2; ++k) p[k] = P::from_floats(f[2 * k], f[2 * k + 1]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) v.v[k] = from_float<T>(f[k]);
  }
  return v;
}

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Every row of a 2-D (rows, cols) view starts 16-byte aligned (a single row needs only its
// start aligned: the stride of a size-1 dimension is arbitrary).
inline bool rows_aligned16(const at::Tensor& t) {
  return is_aligned(t.data_ptr(), 16) &&
         (t.size(0) <= 1 || (t.stride(0) * t.element_size()) % 16 == 0);
}

// Sum over the 32 lanes of a warp; every lane gets the result. Assumes a full warp.
__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the threads of one row of a (threads_per_row, rows_per_block) block: warp shuffle,
// then shared memory when a row spans several warps; every thread of the row gets its row's sum.
// Assumes blockDim.x % 32 == 0 (so no warp straddles two rows; any multiple of 32 works, a
// power of two is not needed), blockDim.x <= 1024, that `scratch` (shared memory) has blockDim.y
// rows, and that every thread of the block calls it (it holds barriers unless blockDim.x == 32).
// The leading barrier makes it safe to call again with the same scratch (e.g. in a row loop).
__device__ __forceinline__ float row_reduce_sum(float v, float (*scratch)[32]) {
  v = warp_reduce_sum(v);
  if (blockDim.x == 32) return v;  // one warp per row: the shuffle was the whole reduction
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) scratch[threadIdx.y][warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[threadIdx.y][lane] : 0.f;
  return warp_reduce_sum(v);
}

__host__ __device__ constexpr int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

// ------------------------------------------------------------------------------ launch queries
//
// Launchers size their grids by the SM count and by a kernel's occupancy. Each query is a
// runtime call (the occupancy one also looks up the function's attributes), paid on every
// launch if not kept: host time that a decode-sized kernel of a few microseconds cannot hide
// (benchmarks/NOTES.md item 5). Neither answer changes during the process, so each is asked
// once and kept: the SM count per device index, the occupancy per (kernel, threads per block,
// dynamic shared memory, device). That key is complete only while no one changes a kernel's
// attributes (cudaFuncSetAttribute: carve-out, max dynamic shared memory); none of the kernels
// that use it does. Both caches are safe to use from several host threads.

// Multiprocessors of a device: queried once per device index.
inline int num_sms(int device) {
  // One slot per device, 0 until asked. Two threads that miss together both ask and store the
  // same answer, so a relaxed atomic is enough (no lock on this path).
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "num_sms: invalid device index ",
              device);
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// cudaOccupancyMaxActiveBlocksPerMultiprocessor(kernel, block_threads, dynamic_smem) on
// `device` (whichever device is current), queried once per key. A failed query throws and
// caches nothing.
inline int max_active_blocks_per_sm(const void* kernel, int block_threads, size_t dynamic_smem,
                                    int device) {
  using Key = std::tuple<const void*, int, size_t, int>;
  static std::mutex mutex;
  static std::map<Key, int> cache;  // a few dozen entries: one per launched specialization
  const Key key{kernel, block_threads, dynamic_smem, device};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int blocks = 0;
  {
    // The query answers for the current device; the guard makes that `device` (the launchers
    // hold a guard for it already) so that the answer matches its key for any caller.
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, block_threads,
                                                                 dynamic_smem));
  }
  const std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, blocks);
  return blocks;
}

// The same for a __global__ function, passed by name (e.g. swiglu_fwd_kernel<T, 8>).
template <typename... Args>
int max_active_blocks_per_sm(void (*kernel)(Args...), int block_threads, size_t dynamic_smem,
                             int device) {
  return max_active_blocks_per_sm(reinterpret_cast<const void*>(kernel), block_threads,
                                  dynamic_smem, device);
}

}  // namespace llama_kernels
