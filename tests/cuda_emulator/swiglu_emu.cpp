// extern "C" entry points running csrc/swiglu_kernels.cuh on the host emulator, for
// swiglu_fwd / swiglu_bwd in tests/cuda_emulator/__init__.py. Same launch path as
// csrc/swiglu.cu: its alignment test, swiglu_launch_settings with an SM count and an occupancy
// given by the caller (a GPU's come from the driver), kThreads per block.
#include "rows_emu.h"
#include "swiglu_kernels.cuh"

namespace {

using namespace llama_kernels;

// The occupancy the settings ask for: blocks_per_sm if > 0, else full occupancy (8 blocks of
// 256 threads: what the kernels' registers allow on sm_80 / sm_90, see their ptxas -v).
ElementwiseLaunch settings(int64_t rows, int64_t cols, int elem_size, bool aligned, int num_sms,
                           int blocks_per_sm, int64_t* info) {
  const ElementwiseLaunch s = swiglu_launch_settings(
      rows, cols, elem_size, aligned, num_sms,
      [&](int vec) { return blocks_per_sm > 0 ? blocks_per_sm : full_occupancy(vec); });
  info[0] = s.vec;
  info[1] = s.blocks;
  return s;
}

}  // namespace

extern "C" {

// info: (vec, blocks) of the launch.
int swiglu_fwd_emu(int dtype, void* out, const void* gate, const void* up, int64_t rows,
                   int64_t cols, int64_t stride_gate_row, int64_t stride_up_row, int num_sms,
                   int blocks_per_sm, int64_t* info, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    if (rows * cols == 0) return;
    rows_emu::with_float_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      const int es = sizeof(T);
      const bool aligned = rows_aligned16(gate, rows, stride_gate_row, es) &&
                           rows_aligned16(up, rows, stride_up_row, es) &&
                           rows_aligned16(out, rows, cols, es);
      const ElementwiseLaunch s = settings(rows, cols, es, aligned, num_sms, blocks_per_sm, info);
      with_vec<T>(s.vec, [&](auto vec) {
        emu::launch(swiglu_fwd_kernel<T, decltype(vec)::value>, dim3(s.blocks), dim3(kThreads),
                    0, static_cast<T*>(out), static_cast<const T*>(gate),
                    static_cast<const T*>(up), rows, cols, stride_gate_row, stride_up_row);
      });
    });
  });
}

int swiglu_bwd_emu(int dtype, void* dgate, void* dup, const void* dout, const void* gate,
                   const void* up, int64_t rows, int64_t cols, int64_t stride_dout_row,
                   int64_t stride_gate_row, int64_t stride_up_row, int num_sms,
                   int blocks_per_sm, int64_t* info, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    if (rows * cols == 0) return;
    rows_emu::with_float_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      const int es = sizeof(T);
      const bool aligned = rows_aligned16(dout, rows, stride_dout_row, es) &&
                           rows_aligned16(gate, rows, stride_gate_row, es) &&
                           rows_aligned16(up, rows, stride_up_row, es) &&
                           rows_aligned16(dgate, rows, cols, es) &&
                           rows_aligned16(dup, rows, cols, es);
      const ElementwiseLaunch s = settings(rows, cols, es, aligned, num_sms, blocks_per_sm, info);
      with_vec<T>(s.vec, [&](auto vec) {
        emu::launch(swiglu_bwd_kernel<T, decltype(vec)::value>, dim3(s.blocks), dim3(kThreads),
                    0, static_cast<T*>(dgate), static_cast<T*>(dup), static_cast<const T*>(dout),
                    static_cast<const T*>(gate), static_cast<const T*>(up), rows, cols,
                    stride_dout_row, stride_gate_row, stride_up_row);
      });
    });
  });
}

}  // extern "C"
