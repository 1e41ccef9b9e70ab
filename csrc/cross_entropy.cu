// The softmax / loss / gradient pass of the fused linear cross entropy over one chunk of logits
// (the math and the layout are in cross_entropy_kernels.cuh):
//   loss_i = logsumexp(z_i) - z_i[t_i]  (0 where ignored, NaN where t_i is outside [0, vocab))
//   write_grad: z_i <- (softmax(z_i) - onehot(t_i)) * c_i in place (0 where ignored)
// The chunk loop and the two matmuls per chunk (cuBLAS through torch) are
// llama_kernels/cuda_cross_entropy.py.
#include "common.cuh"
#include "cross_entropy_kernels.cuh"

#include <torch/library.h>

#include <limits>

namespace llama_kernels {
namespace {

// ------------------------------------------------------------------------------ host side

// logits (rows, vocab) float, unit stride along vocab, overwritten by dz when write_grad;
// target int64 (rows,); loss fp32 (rows,) contiguous, written; scale fp32, 0-dim (every row)
// or (rows,) with any stride, read only when write_grad.
void cross_entropy_chunk_cuda(const at::Tensor& logits, const at::Tensor& target,
                              const at::Tensor& loss, const at::Tensor& scale,
                              int64_t ignore_index, bool write_grad) {
  LK_CHECK_CUDA(logits, "logits");
  LK_CHECK_DIM(logits, 2, "logits");
  LK_CHECK_FLOAT(logits, "logits");
  LK_CHECK_LAST_DIM_CONTIGUOUS(logits, "logits");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1 && vocab <= std::numeric_limits<int>::max(),
              "logits: expected 1 to 2^31 - 1 classes (its last dimension), got ", vocab);
  LK_CHECK_CUDA(target, "target");
  LK_CHECK_SAME_DEVICE(target, logits, "target", "logits");
  LK_CHECK_DTYPE(target, at::kLong, "target");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows, "target: expected shape (", rows,
              ") (the rows of logits), got ", target.sizes());
  LK_CHECK_CONTIGUOUS(target, "target");
  LK_CHECK_CUDA(loss, "loss");
  LK_CHECK_SAME_DEVICE(loss, logits, "loss", "logits");
  LK_CHECK_DTYPE(loss, at::kFloat, "loss");
  TORCH_CHECK(loss.dim() == 1 && loss.size(0) == rows, "loss: expected shape (", rows,
              ") (the rows of logits), got ", loss.sizes());
  LK_CHECK_CONTIGUOUS(loss, "loss");
  LK_CHECK_CUDA(scale, "scale");
  LK_CHECK_SAME_DEVICE(scale, logits, "scale", "logits");
  LK_CHECK_DTYPE(scale, at::kFloat, "scale");
  TORCH_CHECK(scale.dim() == 0 || (scale.dim() == 1 && scale.size(0) == rows),
              "scale: expected shape () or (", rows, ") (the rows of logits), got ",
              scale.sizes());
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const CrossEntropyChunkParams p{logits.data_ptr(),
                                  target.data_ptr<int64_t>(),
                                  loss.data_ptr<float>(),
                                  scale.data_ptr<float>(),
                                  rows,
                                  vocab,
                                  logits.stride(0),
                                  scale.dim() == 0 ? 0 : scale.stride(0),
                                  ignore_index,
                                  write_grad};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOAT(logits.scalar_type(), "cross_entropy_chunk_cuda",
                    [&] { run_cross_entropy_chunk<scalar_t>(p, stream_launch(stream)); });
}

}  // namespace
}  // namespace llama_kernels

TORCH_LIBRARY_IMPL(llama_kernels, CUDA, m) {
  m.impl("cross_entropy_chunk_cuda", &llama_kernels::cross_entropy_chunk_cuda);
}
