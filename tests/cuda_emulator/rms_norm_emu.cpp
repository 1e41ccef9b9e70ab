// extern "C" entry points running csrc/rms_norm_kernels.cuh on the host emulator, for
// rms_norm_fwd / rms_norm_bwd in tests/cuda_emulator/__init__.py, through the header's launch
// path (run_rms_norm_fwd; rms_norm_bwd_settings, rms_norm_bwd_partial_rows, run_rms_norm_bwd),
// the code that csrc/rms_norm.cu runs. This file only fills the operand structs, allocates the
// dw partials and reports the settings.
#include "rows_emu.h"
#include "rms_norm_kernels.cuh"

#include <limits>
#include <vector>

namespace {

using namespace llama_kernels;

// info: (vec, items, threads_per_row, rows_per_block, blocks).
void report(const RowLaunch& s, int64_t* info) {
  info[0] = s.vec;
  info[1] = s.items;
  info[2] = s.threads_per_row;
  info[3] = s.rows_per_block;
  info[4] = s.blocks;
}

}  // namespace

extern "C" {

// residual == nullptr: rms_norm; else add_rms_norm, writing h. info as report's (all 0 when
// nothing was launched).
int rms_norm_fwd_emu(int dtype, void* y, void* h, float* rstd, const void* x,
                     const void* residual, const void* weight, int64_t rows, int64_t dim,
                     int64_t stride_x_row, int64_t stride_residual_row, float eps, int64_t* info,
                     char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    const RmsNormFwdParams p{y, h, rstd, x, residual, weight,
                             rows, dim, stride_x_row, stride_residual_row, eps};
    rows_emu::with_float_dtype(dtype, [&](auto tag) {
      report(run_rms_norm_fwd<decltype(tag)>(p, rows_emu::launch), info);
    });
  });
}

// dh == nullptr: no residual gradient. blocks_per_sm: see rows_emu::occupancy. The fp32
// partials are NaN until the backward writes them, so a slot it skips poisons dweight. info as
// for the forward.
int rms_norm_bwd_emu(int dtype, void* dx, void* dweight, const void* dy, const void* x,
                     const void* weight, const float* rstd, const void* dh, int64_t rows,
                     int64_t dim, int64_t stride_dy_row, int64_t stride_x_row,
                     int64_t stride_dh_row, int num_sms, int blocks_per_sm, int64_t* info,
                     char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    RmsNormBwdParams p{dx, dweight, /*dw_partial, below*/ nullptr, dy, x, weight, rstd, dh,
                       rows, dim, stride_dy_row, stride_x_row, stride_dh_row};
    rows_emu::with_float_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      const RowLaunch s = rms_norm_bwd_settings<T>(p, num_sms, rows_emu::occupancy(blocks_per_sm));
      report(s, info);
      std::vector<float> dw_partial(rms_norm_bwd_partial_rows(s) * dim,
                                    std::numeric_limits<float>::quiet_NaN());
      emu::register_global(dw_partial.data(), dw_partial.size() * sizeof(float));
      p.dw_partial = dw_partial.data();
      run_rms_norm_bwd<T>(p, s, rows_emu::launch);
    });
  });
}

}  // extern "C"
