// extern "C" entry points running csrc/rms_norm_kernels.cuh on the host emulator, for
// rms_norm_fwd / rms_norm_bwd in tests/cuda_emulator/__init__.py. Same launch path as
// csrc/rms_norm.cu: its alignment tests, rms_norm_fwd_launch_settings /
// rms_norm_bwd_launch_settings (an SM count and an occupancy given by the caller; a GPU's
// come from the driver), the same specializations, the dw reduction over the same partials.
#include "rows_emu.h"
#include "rms_norm_kernels.cuh"

#include <limits>
#include <vector>

namespace {

using namespace llama_kernels;


void report(const RowLaunch& s, int64_t* info) {
  info[0] = s.vec;
  info[1] = s.items;
  info[2] = s.threads_per_row;
  info[3] = s.rows_per_block;
  info[4] = s.blocks;
}

}  // namespace

extern "C" {

// residual == nullptr: rms_norm; else add_rms_norm, writing h. info: (vec, items,
// threads_per_row, rows_per_block, blocks).
int rms_norm_fwd_emu(int dtype, void* y, void* h, float* rstd, const void* x,
                     const void* residual, const void* weight, int64_t rows, int64_t dim,
                     int64_t stride_x_row, int64_t stride_residual_row, float eps, int64_t* info,
                     char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    if (rows == 0) return;
    rows_emu::with_float_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      const int es = sizeof(T);
      const bool has_residual = residual != nullptr;
      const bool aligned =
          rows_aligned16(x, rows, stride_x_row, es) &&
          (!has_residual || rows_aligned16(residual, rows, stride_residual_row, es)) &&
          is_aligned(weight, 16) && is_aligned(y, 16) && (!has_residual || is_aligned(h, 16));
      const RowLaunch s = rms_norm_fwd_launch_settings(rows, dim, es, aligned);
      report(s, info);
      with_row_specialization<T>(s, [&](auto vec, auto items) {
        emu::launch(rms_norm_fwd_kernel<T, decltype(vec)::value, decltype(items)::value>,
                    dim3(s.blocks), dim3(s.threads_per_row, s.rows_per_block), 0,
                    static_cast<T*>(y), has_residual ? static_cast<T*>(h) : nullptr, rstd,
                    static_cast<const T*>(x), static_cast<const T*>(residual),
                    static_cast<const T*>(weight), rows, static_cast<int>(dim), stride_x_row,
                    has_residual ? stride_residual_row : 0, inv_dim(dim), eps);
      });
    });
  });
}

// dh == nullptr: no residual gradient. blocks_per_sm > 0 is the occupancy the settings see;
// else the thread limit's (2048 threads per SM / threads per block). The fp32 partials are NaN
// until the backward writes them, so a slot it skips poisons dweight. info as above.
int rms_norm_bwd_emu(int dtype, void* dx, void* dweight, const void* dy, const void* x,
                     const void* weight, const float* rstd, const void* dh, int64_t rows,
                     int64_t dim, int64_t stride_dy_row, int64_t stride_x_row,
                     int64_t stride_dh_row, int num_sms, int blocks_per_sm, int64_t* info,
                     char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    if (rows == 0) return;
    rows_emu::with_float_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      const int es = sizeof(T);
      const bool has_dh = dh != nullptr;
      const bool aligned = rows_aligned16(x, rows, stride_x_row, es) &&
                           rows_aligned16(dy, rows, stride_dy_row, es) &&
                           (!has_dh || rows_aligned16(dh, rows, stride_dh_row, es)) &&
                           is_aligned(weight, 16) && is_aligned(dx, 16);
      const RowLaunch s = rms_norm_bwd_launch_settings(
          rows, dim, es, aligned, num_sms, [&](const RowLaunch& shape) {
            return blocks_per_sm > 0
                       ? blocks_per_sm
                       : kMaxThreadsPerSm / (shape.threads_per_row * shape.rows_per_block);
          });
      report(s, info);
      const int64_t n_partials = s.blocks * s.rows_per_block;
      std::vector<float> dw_partial(n_partials * dim, std::numeric_limits<float>::quiet_NaN());
      emu::register_global(dw_partial.data(), dw_partial.size() * sizeof(float));
      with_row_specialization<T, true>(s, [&](auto vec, auto items) {
        emu::launch(rms_norm_bwd_kernel<T, decltype(vec)::value, decltype(items)::value>,
                    dim3(s.blocks), dim3(s.threads_per_row, s.rows_per_block), 0,
                    static_cast<T*>(dx), dw_partial.data(), static_cast<const T*>(dy),
                    static_cast<const T*>(x), static_cast<const T*>(weight), rstd,
                    static_cast<const T*>(dh), rows, static_cast<int>(dim), stride_dy_row,
                    stride_x_row, has_dh ? stride_dh_row : 0, inv_dim(dim));
      });
      emu::launch(rms_norm_dw_kernel<T>, dim3(cdiv(dim, 32)), dim3(32, kReduceRows), 0,
                  static_cast<T*>(dweight), static_cast<const float*>(dw_partial.data()),
                  n_partials, static_cast<int>(dim));
    });
  });
}

}  // extern "C"
