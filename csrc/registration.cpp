// Every C++ op schema of the extension, in one place. Kernels register their CUDA
// implementations beside themselves (TORCH_LIBRARY_IMPL(llama_kernels, CUDA, m) in <op>.cu).
//
// These are the raw kernels: no autograd and no backend choice. The differentiable ops that
// users reach (llama_kernels::rms_norm_fwd etc.) are defined in Python (llama_kernels/ops/) and
// call these for backend="cuda". Row ops take 2-D (rows, dim) tensors with unit stride along
// dim; rstd is fp32 (rows,).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import llama_kernels._C` loads this library (and so runs the registrations below); the
// module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(llama_kernels, m) {
  m.def("rms_norm_fwd_cuda(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("add_rms_norm_fwd_cuda(Tensor x, Tensor residual, Tensor weight, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd_cuda(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? dh)"
        " -> (Tensor, Tensor)");
  m.def("swiglu_fwd_cuda(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd_cuda(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("rotary_cuda(Tensor x, Tensor cos, Tensor sin, Tensor? positions, bool interleaved,"
        " bool conjugate) -> Tensor");
  m.def("flash_attention_fwd_cuda(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale)"
        " -> (Tensor, Tensor)");
  m.def("flash_attention_bwd_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out,"
        " Tensor lse, bool causal, float softmax_scale) -> (Tensor, Tensor, Tensor)");
  m.def("flash_attention_varlen_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q,"
        " Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal,"
        " float softmax_scale) -> (Tensor, Tensor)");
  m.def("flash_attention_varlen_bwd_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out,"
        " Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q,"
        " int max_seqlen_k, bool causal, float softmax_scale) -> (Tensor, Tensor, Tensor)");
  // Writes the new k, v into k_cache and v_cache in place (declared mutations).
  m.def("flash_attention_kvcache_cuda(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache,"
        " Tensor cache_seqlens, Tensor? k, Tensor? v, Tensor? block_table, Tensor? rotary_cos,"
        " Tensor? rotary_sin, bool rotary_interleaved, bool causal, float softmax_scale)"
        " -> Tensor");
  // Writes each row's loss into loss and, with write_grad, dz over logits (declared mutations).
  m.def("cross_entropy_chunk_cuda(Tensor(a!) logits, Tensor target, Tensor(b!) loss,"
        " Tensor scale, int ignore_index, bool write_grad) -> ()");
}
