// extern "C" entry points running csrc/swiglu_kernels.cuh on the host emulator, for
// swiglu_fwd / swiglu_bwd in tests/cuda_emulator/__init__.py, through the header's launch path
// (run_swiglu_fwd, run_swiglu_bwd), the code that csrc/swiglu.cu runs. The SM count and the
// occupancy (rows_emu::occupancy) stand in for the driver's answers; this file only fills the
// operand structs and reports the settings.
#include "rows_emu.h"
#include "swiglu_kernels.cuh"

namespace {

using namespace llama_kernels;

// info: (vec, blocks) of the launch (0, 0 when nothing was launched).
void report(const ElementwiseLaunch& s, int64_t* info) {
  info[0] = s.vec;
  info[1] = s.blocks;
}

}  // namespace

extern "C" {

int swiglu_fwd_emu(int dtype, void* out, const void* gate, const void* up, int64_t rows,
                   int64_t cols, int64_t stride_gate_row, int64_t stride_up_row, int num_sms,
                   int blocks_per_sm, int64_t* info, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    const SwigluFwdParams p{out, gate, up, rows, cols, stride_gate_row, stride_up_row};
    rows_emu::with_float_dtype(dtype, [&](auto tag) {
      report(run_swiglu_fwd<decltype(tag)>(p, num_sms, rows_emu::occupancy(blocks_per_sm),
                                           rows_emu::launch),
             info);
    });
  });
}

int swiglu_bwd_emu(int dtype, void* dgate, void* dup, const void* dout, const void* gate,
                   const void* up, int64_t rows, int64_t cols, int64_t stride_dout_row,
                   int64_t stride_gate_row, int64_t stride_up_row, int num_sms,
                   int blocks_per_sm, int64_t* info, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    const SwigluBwdParams p{dgate, dup, dout, gate, up, rows, cols, stride_dout_row,
                            stride_gate_row, stride_up_row};
    rows_emu::with_float_dtype(dtype, [&](auto tag) {
      report(run_swiglu_bwd<decltype(tag)>(p, num_sms, rows_emu::occupancy(blocks_per_sm),
                                           rows_emu::launch),
             info);
    });
  });
}

}  // extern "C"
