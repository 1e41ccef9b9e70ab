// Shared pieces of every llama-kernels CUDA host file: input checks, dtype dispatch, the
// cached launch queries and the launch and occupancy callables of the kernel headers' launch
// paths. The device helpers (16-byte vector loads, fp32 conversions, warp/block reductions) and
// the alignment tests are in device_common.cuh, torch-free for the emulator.
//
// Light headers: ATen/core/Tensor.h and c10/cuda instead of torch/all.h or
// ATen/cuda/CUDAContext.h, which compile about 3x slower and pull in cuBLAS.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "device_common.cuh"

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

// ------------------------------------------------------------------------------ launch queries
//
// Launchers size their grids by the SM count and by a kernel's occupancy. Each query is a
// runtime call (the occupancy one also looks up the function's attributes), paid on every
// launch if not kept: host time that a decode-sized kernel of a few microseconds cannot hide
// (benchmarks/NOTES.md, host overhead of the CUDA launchers). Neither answer changes during the
// process, so each is asked once and kept: the SM count per device index, the occupancy per
// (kernel, threads per block, dynamic shared memory, device). That key is complete only while
// no one changes a kernel's attributes (cudaFuncSetAttribute: carve-out, max dynamic shared
// memory); none of the kernels that use it does. Both caches are safe to use from several host
// threads.

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

// The most dynamic shared memory one block may opt in to on a device
// (cudaDevAttrMaxSharedMemoryPerBlockOptin): queried once per device index, as num_sms.
inline size_t max_smem_per_block_optin(int device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS,
              "max_smem_per_block_optin: invalid device index ", device);
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return static_cast<size_t>(n);
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

// ------------------------------------------------------------------------------ launch callables
// The callables that the .cu files pass to the kernel headers' run_* functions (the launch-path
// contract is in device_common.cuh). The caller holds a CUDAGuard for the operands' device.

// kernel<<<grid, block, smem_bytes, stream>>>(args...), then the launch check.
inline auto stream_launch(cudaStream_t stream) {
  return [stream](auto kernel, dim3 grid, dim3 block, size_t smem_bytes, auto... args) {
    kernel<<<grid, block, smem_bytes, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
}

// Resident blocks per SM of a kernel on `device`, from the cache above.
inline auto occupancy_on(int device) {
  return [device](auto kernel, int block_threads, size_t smem_bytes) {
    return max_active_blocks_per_sm(kernel, block_threads, smem_bytes, device);
  };
}

}  // namespace llama_kernels
