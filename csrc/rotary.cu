// Rotary position embedding (the math of reference.py apply_rotary):
//   forward   each pair (a, b) at angle t: (a cos t - b sin t, a sin t + b cos t)
//   backward  the rotation by -t (R(t)^T = R(-t)): the same kernel with conjugate = true
// Pairs are (x[2i], x[2i+1]) when interleaved (Meta), else (x[i], x[i + D/2]) (GPT-NeoX / HF).
// Pair i of token (b, s) uses table row positions[b, s] (row s without positions):
// cos/sin[row, i]. fp32 math, each output rounded once; x (B, S, H, D) with unit stride along D
// and any other strides; the output is contiguous.
#include "common.cuh"
#include "rotary_kernels.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

namespace llama_kernels {
namespace {

// ------------------------------------------------------------------------------ host side

at::Tensor rotary_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& positions, bool interleaved,
                       bool conjugate) {
  LK_CHECK_CUDA(x, "x");
  LK_CHECK_DIM(x, 4, "x");
  LK_CHECK_FLOAT(x, "x");
  LK_CHECK_LAST_DIM_CONTIGUOUS(x, "x");
  const int64_t batch = x.size(0), seqlen = x.size(1), heads = x.size(2), head_dim = x.size(3);
  TORCH_CHECK(head_dim % 2 == 0 && head_dim >= 2 && head_dim <= kMaxHeadDim,
              "x: expected an even head_dim (last dimension) in [2, ", kMaxHeadDim, "], got ",
              head_dim);
  TORCH_CHECK(heads * head_dim <= std::numeric_limits<int>::max(),
              "x: heads * head_dim too large, got ", heads, " x ", head_dim);
  LK_CHECK_CUDA(cos, "cos");
  LK_CHECK_SAME_DEVICE(cos, x, "cos", "x");
  LK_CHECK_DTYPE(cos, at::kFloat, "cos");
  LK_CHECK_DIM(cos, 2, "cos");
  TORCH_CHECK(cos.size(1) == head_dim / 2, "cos: expected shape (rows, ", head_dim / 2,
              ") for head_dim ", head_dim, ", got ", cos.sizes());
  LK_CHECK_CONTIGUOUS(cos, "cos");
  LK_CHECK_CUDA(sin, "sin");
  LK_CHECK_SAME_DEVICE(sin, x, "sin", "x");
  LK_CHECK_DTYPE(sin, at::kFloat, "sin");
  TORCH_CHECK(sin.sizes() == cos.sizes(), "sin: expected shape ", cos.sizes(),
              " (that of cos), got ", sin.sizes());
  LK_CHECK_CONTIGUOUS(sin, "sin");
  const bool has_positions = positions.has_value() && positions->defined();
  if (has_positions) {
    const at::Tensor& pos = *positions;
    LK_CHECK_CUDA(pos, "positions");
    LK_CHECK_SAME_DEVICE(pos, x, "positions", "x");
    LK_CHECK_DTYPE(pos, at::kLong, "positions");
    TORCH_CHECK(pos.dim() == 2 && pos.size(0) == batch && pos.size(1) == seqlen,
                "positions: expected shape (", batch, ", ", seqlen,
                ") (batch, seqlen of x), got ", pos.sizes());
    LK_CHECK_CONTIGUOUS(pos, "positions");
  } else {
    TORCH_CHECK(cos.size(0) >= seqlen, "cos: expected at least ", seqlen,
                " rows (the seqlen of x) when positions is None, got ", cos.size(0));
  }

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({batch, seqlen, heads, head_dim}, x.options());
  const RotaryParams p{out.data_ptr(), x.data_ptr(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                       has_positions ? positions->data_ptr<int64_t>() : nullptr, batch, seqlen,
                       heads, head_dim, cos.size(0), x.stride(0), x.stride(1), x.stride(2),
                       interleaved, conjugate};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOAT(x.scalar_type(), "rotary_cuda",
                    [&] { run_rotary<scalar_t>(p, stream_launch(stream)); });
  return out;
}

}  // namespace
}  // namespace llama_kernels

TORCH_LIBRARY_IMPL(llama_kernels, CUDA, m) {
  m.impl("rotary_cuda", &llama_kernels::rotary_cuda);
}
