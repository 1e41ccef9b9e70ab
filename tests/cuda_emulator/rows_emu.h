// Shared by the row ops' emulator entry points (swiglu_emu.cpp, rms_norm_emu.cpp,
// rotary_emu.cpp; one translation unit each, because each kernel header keeps its constants in
// an anonymous namespace and two of them share names). Every launch decision is the kernel
// headers' launch path (their run_* functions, the code the .cu files ship); the entry points
// only turn C arguments into its operand structs and pass it the two callables below.
#pragma once

#include "emulator.h"
#include "device_common.cuh"

#include <cstdint>
#include <stdexcept>
#include <string>

namespace rows_emu {

// The launch callable of the run_* functions: kernel(args...) on every thread of the grid.
inline constexpr auto launch = [](auto kernel, dim3 grid, dim3 block, size_t smem_bytes,
                                  const auto&... args) {
  emu::launch(kernel, grid, block, smem_bytes, args...);
};

// The occupancy callable in place of the driver's answer: blocks_per_sm where > 0, else the
// thread limit's 2048 / block_threads (a GPU may answer less where a kernel's registers limit
// it; tests that depend on the grid pass blocks_per_sm).
inline auto occupancy(int blocks_per_sm) {
  return [blocks_per_sm](auto /*kernel*/, int block_threads, size_t /*smem_bytes*/) {
    return blocks_per_sm > 0 ? blocks_per_sm : llama_kernels::kMaxThreadsPerSm / block_threads;
  };
}

// fn(T{}) for dtype code 0 fp16, 1 bf16, 2 fp32.
template <typename Fn>
void with_float_dtype(int dtype, Fn&& fn) {
  if (dtype == 2) {
    fn(float());
  } else {
    emu::with_dtype(dtype, fn);
  }
}

}  // namespace rows_emu

extern "C" {
// Every library built on this header has one definition of these (rows_emu.cpp).
void emu_register_global(const void* ptr, size_t bytes);
void emu_clear_globals();
}
