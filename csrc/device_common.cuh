// Device-side helpers of the row kernels (fp32 conversions, 16-byte vector loads and stores,
// warp/block reductions) and the host-side pieces of their launch paths (alignment tests,
// vector-width dispatch, grid limit). Torch-free, so that the kernel headers
// (csrc/*_kernels.cuh) compile both in the extension (through common.cuh) and on the host
// emulator (tests/cuda_emulator/emulator.h, which must be included first and provides the CUDA
// names used here: __half2, __shfl_xor_sync, __syncthreads, blockDim, threadIdx, ...).
#pragma once

#ifndef LLAMA_KERNELS_EMULATOR
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace llama_kernels {

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

// Host side: the alignment tests of the kernel headers' run_* functions, which decide between
// the 16-byte vector and the scalar specializations.
inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Every row of a (rows, cols) view with row stride `stride_row` (elements) starts 16-byte
// aligned (a single row needs only its start aligned: the stride of a size-1 dimension is
// arbitrary).
inline bool rows_aligned16(const void* ptr, int64_t rows, int64_t stride_row, int elem_size) {
  return is_aligned(ptr, 16) && (rows <= 1 || (stride_row * elem_size) % 16 == 0);
}

// One operand of the 16-byte path's test: a (rows, cols) view's start and row stride (elements);
// stride 0 for a single vector (a weight), nullptr for an absent operand (it passes).
struct RowsOperand {
  const void* ptr;
  int64_t stride_row;
};

// rows_aligned16 for every present operand, all of `rows` rows.
inline bool rows_aligned16(std::initializer_list<RowsOperand> operands, int64_t rows,
                           int elem_size) {
  for (const RowsOperand& o : operands) {
    if (o.ptr != nullptr && !rows_aligned16(o.ptr, rows, o.stride_row, elem_size)) return false;
  }
  return true;
}

// Host side: calls f(integral_constant<kVec>) for a run-time vector width, 1 element or 16
// bytes (the two specializations of every row kernel). Any other width is a launch-settings bug.
template <typename T, typename F>
void with_vec(int vec, F&& f) {
  if (vec == 1) return f(std::integral_constant<int, 1>{});
  if (vec != kVec16<T>) throw std::logic_error("internal error: vector width " + std::to_string(vec));
  f(std::integral_constant<int, kVec16<T>>{});
}

// ------------------------------------------------------------------------------ launch paths
// Each kernel header (rms_norm_kernels.cuh, swiglu_kernels.cuh, rotary_kernels.cuh) ends in its
// launch path: run_* functions that take the operands as a plain struct and make every decision
// between them and the launches (alignment test, launch settings, specialization, grid), then
// call launch(kernel, grid, block, smem_bytes, args...), which runs
// kernel<<<grid, block, smem_bytes>>>(args...) the caller's way: on the current CUDA stream with
// a launch check (common.cuh's stream_launch, in the .cu files), or on the host emulator
// (tests/cuda_emulator/rows_emu.h), so that the emulator tests the launch code that ships.
// Where settings depend on occupancy, occupancy(kernel, block_threads, dynamic_smem_bytes) gives
// the resident blocks per SM of a specialization.
// Every row kernel declares __launch_bounds__(max threads, 1): without the ", 1" ptxas spills a
// register or two (STACK:8) to reach a higher occupancy tier (sm_80 and sm_90, nvcc 13.0);
// tests/test_cuda_build.py asserts STACK:0 for every kernel.

// Host side: the 1-D grid of `blocks` blocks. gridDim.x is at most 2^31 - 1 on sm_80 / sm_90;
// a larger grid is refused before any launch, as std::invalid_argument("<what> (<count>)")
// (a RuntimeError in Python).
inline dim3 grid_1d(int64_t blocks, const char* what, int64_t count) {
  if (blocks > std::numeric_limits<int>::max()) {
    throw std::invalid_argument(std::string(what) + " (" + std::to_string(count) + ")");
  }
  return dim3(static_cast<unsigned>(blocks));
}

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* ptr) {
#ifdef LLAMA_KERNELS_EMULATOR  // alignment and bounds, which a GPU reports as a fault or not at all
  emu::check_global_access(ptr, sizeof(Vec<T, N>), "load_vec");
#endif
  return *reinterpret_cast<const Vec<T, N>*>(ptr);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, N>& v) {
#ifdef LLAMA_KERNELS_EMULATOR
  emu::check_global_access(ptr, sizeof(Vec<T, N>), "store_vec");
#endif
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

// Tells the compiler that the registers of v may have changed (an empty asm that it cannot see
// through): fp32 values derived from v before this point are then recomputed from v after it
// instead of being kept alive, e.g. across a block reduction. A no-op on the host emulator.
template <typename T, int N>
__device__ __forceinline__ void opaque(Vec<T, N>& v) {
#ifndef LLAMA_KERNELS_EMULATOR
  if constexpr (sizeof(v) % 4 == 0) {
    auto* words = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
    for (int k = 0; k < static_cast<int>(sizeof(v) / 4); ++k) asm volatile("" : "+r"(words[k]));
  } else {
    static_assert(sizeof(v) == 2, "opaque: 16-bit or whole 32-bit registers");
    asm volatile("" : "+h"(*reinterpret_cast<uint16_t*>(&v)));
  }
#else
  (void)v;
#endif
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

}  // namespace llama_kernels
