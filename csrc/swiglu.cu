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

// Both ops size their grids by the SM count and each specialization's occupancy, from
// common.cuh's caches: asked once per process, not per call (they would cost microseconds of
// host time per decode-sized op).
at::Tensor swiglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up) {
  check_gate(gate);
  check_operand(up, gate, "up");
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor out = at::empty({gate.size(0), gate.size(1)}, gate.options());
  const SwigluFwdParams p{out.data_ptr(), gate.data_ptr(), up.data_ptr(), gate.size(0),
                          gate.size(1), gate.stride(0), up.stride(0)};
  const int device = gate.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOAT(gate.scalar_type(), "swiglu_fwd_cuda", [&] {
    run_swiglu_fwd<scalar_t>(p, num_sms(device), occupancy_on(device), stream_launch(stream));
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
  at::Tensor dgate = at::empty({gate.size(0), gate.size(1)}, gate.options());
  at::Tensor dup = at::empty({gate.size(0), gate.size(1)}, gate.options());
  const SwigluBwdParams p{dgate.data_ptr(), dup.data_ptr(), dout.data_ptr(), gate.data_ptr(),
                          up.data_ptr(), gate.size(0), gate.size(1), dout.stride(0),
                          gate.stride(0), up.stride(0)};
  const int device = gate.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOAT(gate.scalar_type(), "swiglu_bwd_cuda", [&] {
    run_swiglu_bwd<scalar_t>(p, num_sms(device), occupancy_on(device), stream_launch(stream));
  });
  return {dgate, dup};
}

}  // namespace
}  // namespace llama_kernels

TORCH_LIBRARY_IMPL(llama_kernels, CUDA, m) {
  m.impl("swiglu_fwd_cuda", &llama_kernels::swiglu_fwd_cuda);
  m.impl("swiglu_bwd_cuda", &llama_kernels::swiglu_bwd_cuda);
}
