// RMSNorm and residual-add + RMSNorm, forward and backward (the math of reference.py):
//   forward   y = x * rstd * w (fp32, rounded once),  rstd = 1 / sqrt(mean(x^2) + eps)
//   add       h = round(x + residual) is stored, then y = rms_norm(h) of the ROUNDED h
//   backward  dx = rstd * (g - xhat * mean(g * xhat)) [+ dh],  g = dy * w,  xhat = x * rstd
//             dw = sum over rows of dy * xhat
// Rows are 2-D (rows, dim) views with unit column stride and any row stride; outputs are
// contiguous. fp32 inside; rstd is kept in fp32 for the backward.
#include "common.cuh"
#include "rms_norm_kernels.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace llama_kernels {
namespace {

// ------------------------------------------------------------------------------ host side

void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps: expected a finite non-negative float, got ",
              eps);
}

// x (rows, dim) on a GPU in fp32/fp16/bf16 with unit column stride; weight (dim,) contiguous,
// same device and dtype.
void check_rows_and_weight(const at::Tensor& x, const at::Tensor& weight) {
  LK_CHECK_CUDA(x, "x");
  LK_CHECK_DIM(x, 2, "x");
  LK_CHECK_FLOAT(x, "x");
  LK_CHECK_LAST_DIM_CONTIGUOUS(x, "x");
  TORCH_CHECK(x.size(1) > 0 && x.size(1) <= std::numeric_limits<int>::max() / 2,
              "x: expected a last dimension in [1, 2**30), got ", x.size(1));
  LK_CHECK_CUDA(weight, "weight");
  LK_CHECK_SAME_DEVICE(weight, x, "weight", "x");
  LK_CHECK_DTYPE(weight, x.scalar_type(), "weight");
  LK_CHECK_DIM(weight, 1, "weight");
  TORCH_CHECK(weight.size(0) == x.size(1), "weight: expected shape (", x.size(1),
              ",) to match the last dimension of x, got ", weight.sizes());
  LK_CHECK_CONTIGUOUS(weight, "weight");
}

#define LK_CHECK_LIKE_X(t, name)                                                          \
  do {                                                                                    \
    LK_CHECK_CUDA(t, name);                                                               \
    LK_CHECK_SAME_DEVICE(t, x, name, "x");                                                \
    LK_CHECK_DTYPE(t, x.scalar_type(), name);                                             \
    TORCH_CHECK((t).sizes() == x.sizes(), name ": expected shape ", x.sizes(),            \
                " (that of x), got ", (t).sizes());                                       \
    LK_CHECK_LAST_DIM_CONTIGUOUS(t, name);                                                \
  } while (0)

// Shared by rms_norm_fwd_cuda and add_rms_norm_fwd_cuda (residual undefined for the former).
// The caller holds a CUDAGuard for x's device.
void launch_rms_norm_fwd(const at::Tensor& y, const at::Tensor& h, const at::Tensor& rstd,
                         const at::Tensor& x, const at::Tensor& residual,
                         const at::Tensor& weight, double eps) {
  const bool has_residual = residual.defined();
  const RmsNormFwdParams p{y.data_ptr(), has_residual ? h.data_ptr() : nullptr,
                           rstd.data_ptr<float>(), x.data_ptr(),
                           has_residual ? residual.data_ptr() : nullptr, weight.data_ptr(),
                           x.size(0), x.size(1), x.stride(0),
                           has_residual ? residual.stride(0) : 0, static_cast<float>(eps)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOAT(x.scalar_type(), "rms_norm_fwd_cuda",
                    [&] { run_rms_norm_fwd<scalar_t>(p, stream_launch(stream)); });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x,
                                                     const at::Tensor& weight, double eps) {
  check_rows_and_weight(x, weight);
  check_eps(eps);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  launch_rms_norm_fwd(y, at::Tensor(), rstd, x, at::Tensor(), weight, eps);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_cuda(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows_and_weight(x, weight);
  LK_CHECK_LIKE_X(residual, "residual");
  check_eps(eps);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor h = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  launch_rms_norm_fwd(y, h, rstd, x, residual, weight, eps);
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& weight,
                                                     const at::Tensor& rstd,
                                                     const std::optional<at::Tensor>& dh) {
  check_rows_and_weight(x, weight);
  LK_CHECK_LIKE_X(dy, "dy");
  const bool has_dh = dh.has_value() && dh->defined();
  if (has_dh) LK_CHECK_LIKE_X(*dh, "dh");
  LK_CHECK_CUDA(rstd, "rstd");
  LK_CHECK_SAME_DEVICE(rstd, x, "rstd", "x");
  LK_CHECK_DTYPE(rstd, at::kFloat, "rstd");
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == x.size(0), "rstd: expected shape (",
              x.size(0), ",) (the rows of x), got ", rstd.sizes());
  LK_CHECK_CONTIGUOUS(rstd, "rstd");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor dweight = at::empty_like(weight);
  RmsNormBwdParams p{dx.data_ptr(), dweight.data_ptr(), /*dw_partial, below*/ nullptr,
                     dy.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr<float>(),
                     has_dh ? dh->data_ptr() : nullptr, x.size(0), x.size(1), dy.stride(0),
                     x.stride(0), has_dh ? dh->stride(0) : 0};
  // SM count and occupancy from common.cuh's caches: asked once per process, not per call.
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOAT(x.scalar_type(), "rms_norm_bwd_cuda", [&] {
    const RowLaunch s = rms_norm_bwd_settings<scalar_t>(p, num_sms(device), occupancy_on(device));
    const at::Tensor dw_partial =
        at::empty({rms_norm_bwd_partial_rows(s), x.size(1)}, x.options().dtype(at::kFloat));
    p.dw_partial = dw_partial.data_ptr<float>();
    run_rms_norm_bwd<scalar_t>(p, s, stream_launch(stream));
  });
  return {dx, dweight};
}

}  // namespace
}  // namespace llama_kernels

TORCH_LIBRARY_IMPL(llama_kernels, CUDA, m) {
  m.impl("rms_norm_fwd_cuda", &llama_kernels::rms_norm_fwd_cuda);
  m.impl("add_rms_norm_fwd_cuda", &llama_kernels::add_rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd_cuda", &llama_kernels::rms_norm_bwd_cuda);
}
