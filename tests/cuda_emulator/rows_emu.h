// Shared by the row ops' emulator entry points (swiglu_emu.cpp, rms_norm_emu.cpp,
// rotary_emu.cpp; one translation unit each, because each kernel header keeps its constants in
// an anonymous namespace and two of them share names). The launch decisions are the headers'
// launch-settings functions and the specialization dispatch (with_vec,
// with_row_specialization); these files only repeat the host files' alignment tests.
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

}  // namespace rows_emu

extern "C" {
// Every library built on this header has one definition of these (rows_emu.cpp).
void emu_register_global(const void* ptr, size_t bytes);
void emu_clear_globals();
}
