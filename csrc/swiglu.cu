// SwiGLU, forward and backward (the math of reference.py):
//   forward   out = silu(g) * u = g * sigmoid(g) * u
//   backward  du = dout * g * sigmoid(g),  dg = dout * u * s * (1 + g * (1 - s)),  s = sigmoid(g)
// fp32 math, each output rounded once. Inputs are 2-D (rows, cols) views with unit column
// stride and any row stride (gate and up may be the two halves of one fused projection);
// outputs are contiguous.
#include "common.cuh"
#include "swiglu_kernels.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace llama_kernels {
namespace {

// ------------------------------------------------------------------------------ host side

void check_operand(const at::Tensor& t, const at::Tensor& gate, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == gate.device(), name, ": expected device ", gate.device(),
              " (that of gate), got ", t.device());
  TORCH_CHECK(t.scalar_type() == gate.scalar_type(), name, ": expected dtype ",
              gate.scalar_type(), " (that of gate), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == gate.sizes(), name, ": expected shape ", gate.sizes(),
              " (that of gate), got ", t.sizes());
  TORCH_CHECK(t.stride(-1) == 1, name,
              ": expected unit stride in the last dimension, got strides ", t.strides());
}

void check_gate(const at::Tensor& gate) {
  LK_CHECK_CUDA(gate, "gate");
  LK_CHECK_DIM(gate, 2, "gate");
  LK_CHECK_FLOAT(gate, "gate");
  LK_CHECK_LAST_DIM_CONTIGUOUS(gate, "gate");
}

// Runs f(kernel, T{}) with kernel = kernel_of(T{}, integral_constant<kVec>{}) for the dtype T
// and the vector width: one place that maps run-time settings to a specialization, used both
// to query its occupancy and to launch it.
template <typename KernelOf, typename F>
void with_kernel(at::ScalarType dtype, int vec, const KernelOf& kernel_of, F&& f) {
  LK_DISPATCH_FLOAT(dtype, "swiglu", [&] {
    with_vec<scalar_t>(vec, [&](auto v) { f(kernel_of(scalar_t{}, v), scalar_t{}); });
  });
}

// The SM count and each specialization's occupancy come from common.cuh's caches: asked once
// per process, not per call (they would cost microseconds of host time per decode-sized op).
template <typename KernelOf>
ElementwiseLaunch pick_launch(const at::Tensor& gate, bool aligned, const KernelOf& kernel_of) {
  const int device = gate.get_device();
  return swiglu_launch_settings(
      gate.size(0), gate.size(1), gate.element_size(), aligned, num_sms(device), [&](int vec) {
        int resident = 0;
        with_kernel(gate.scalar_type(), vec, kernel_of, [&](auto kernel, auto) {
          resident = max_active_blocks_per_sm(kernel, kThreads, 0, device);
        });
        return resident;
      });
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up) {
  check_gate(gate);
  check_operand(up, gate, "up");
  const c10::cuda::CUDAGuard guard(gate.device());
  const int64_t rows = gate.size(0), cols = gate.size(1);
  at::Tensor out = at::empty({rows, cols}, gate.options());
  if (out.numel() == 0) return out;
  const bool aligned = rows_aligned16(gate) && rows_aligned16(up) && rows_aligned16(out);
  const auto kernel_of = [](auto t, auto vec) {
    return swiglu_fwd_kernel<decltype(t), decltype(vec)::value>;
  };
  const ElementwiseLaunch s = pick_launch(gate, aligned, kernel_of);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_kernel(gate.scalar_type(), s.vec, kernel_of, [&](auto kernel, auto tag) {
    using T = decltype(tag);
    kernel<<<static_cast<unsigned>(s.blocks), kThreads, 0, stream>>>(
        static_cast<T*>(out.data_ptr()), static_cast<const T*>(gate.data_ptr()),
        static_cast<const T*>(up.data_ptr()), rows, cols, gate.stride(0), up.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dout,
                                                   const at::Tensor& gate,
                                                   const at::Tensor& up) {
  check_gate(gate);
  check_operand(up, gate, "up");
  check_operand(dout, gate, "dout");
  const c10::cuda::CUDAGuard guard(gate.device());
  const int64_t rows = gate.size(0), cols = gate.size(1);
  at::Tensor dgate = at::empty({rows, cols}, gate.options());
  at::Tensor dup = at::empty({rows, cols}, gate.options());
  if (dgate.numel() == 0) return {dgate, dup};
  const bool aligned = rows_aligned16(dout) && rows_aligned16(gate) && rows_aligned16(up) &&
                       rows_aligned16(dgate) && rows_aligned16(dup);
  const auto kernel_of = [](auto t, auto vec) {
    return swiglu_bwd_kernel<decltype(t), decltype(vec)::value>;
  };
  const ElementwiseLaunch s = pick_launch(gate, aligned, kernel_of);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_kernel(gate.scalar_type(), s.vec, kernel_of, [&](auto kernel, auto tag) {
    using T = decltype(tag);
    kernel<<<static_cast<unsigned>(s.blocks), kThreads, 0, stream>>>(
        static_cast<T*>(dgate.data_ptr()), static_cast<T*>(dup.data_ptr()),
        static_cast<const T*>(dout.data_ptr()), static_cast<const T*>(gate.data_ptr()),
        static_cast<const T*>(up.data_ptr()), rows, cols, dout.stride(0), gate.stride(0),
        up.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dgate, dup};
}

}  // namespace
}  // namespace llama_kernels

TORCH_LIBRARY_IMPL(llama_kernels, CUDA, m) {
  m.impl("swiglu_fwd_cuda", &llama_kernels::swiglu_fwd_cuda);
  m.impl("swiglu_bwd_cuda", &llama_kernels::swiglu_bwd_cuda);
}
