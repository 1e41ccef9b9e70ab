// Shared by the row ops' emulator entry points (swiglu_emu.cpp, rms_norm_emu.cpp,
// rotary_emu.cpp; one translation unit each, because each kernel header keeps its constants in
// an anonymous namespace and two of them share names). The launch decisions are the headers'
// launch-settings functions; these files only repeat the host files' alignment tests and
// dispatch to a specialization.
#pragma once

#include "emulator.h"

#include <cstdint>
#include <stdexcept>
#include <string>

namespace rows_emu {

// A small GPU: grid-stride kernels (SwiGLU, the RMSNorm backward) then take several steps on
// test-sized inputs.
constexpr int kEmulatedSms = 8;

// fn(T{}) for dtype code 0 fp16, 1 bf16, 2 fp32.
template <typename Fn>
void with_float_dtype(int dtype, Fn&& fn) {
  if (dtype == 2) {
    fn(float());
  } else {
    emu::with_dtype(dtype, fn);
  }
}

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// common.cuh's rows_aligned16 for a (rows, cols) view: its start and its row stride.
inline bool rows_aligned16(const void* ptr, int64_t rows, int64_t stride_row, int elem_size) {
  return is_aligned(ptr, 16) && (rows <= 1 || (stride_row * elem_size) % 16 == 0);
}

// Calls f(integral_constant<kVec>) for vec == 1 or 16 bytes of T.
template <typename T, typename F>
void with_vec(int vec, F&& f) {
  if (vec == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (vec == 16 / static_cast<int>(sizeof(T))) {
    f(std::integral_constant<int, 16 / sizeof(T)>{});
  } else {
    throw std::runtime_error("internal error: vector width " + std::to_string(vec));
  }
}

}  // namespace rows_emu

extern "C" {
// Every library built on this header has one definition of these (rows_emu.cpp).
void emu_register_global(const void* ptr, size_t bytes);
void emu_clear_globals();
}
