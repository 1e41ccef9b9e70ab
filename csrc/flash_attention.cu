// Host side of the CUDA flash attention: input checks, outputs, launches on the current stream.
// The kernels and every launch decision are in flash_attention_kernels.cuh and the headers it
// includes (forward, decode, backward).
//
//   flash_attention_fwd_cuda(q, k, v, causal, softmax_scale) -> (out, lse)
//   flash_attention_bwd_cuda(dout, q, k, v, out, lse, causal, softmax_scale) -> (dq, dk, dv)
// q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), fp16 or bf16, D in {64, 128}, Hq % Hkv == 0; any
// strides with unit stride along D (views of a fused qkv projection work without a copy);
// a tensor whose rows are not 16-byte aligned is copied to a contiguous one first. Outputs are
// contiguous; lse is fp32 (B, Hq, Sq).
//
// Packed sequences (flash-attn's varlen layout), the same kernels' VARLEN specializations:
//   flash_attention_varlen_fwd_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
//                                   max_seqlen_k, causal, softmax_scale) -> (out, lse)
//   flash_attention_varlen_bwd_cuda(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
//                                   max_seqlen_q, max_seqlen_k, causal, softmax_scale)
//                                   -> (dq, dk, dv)
// q (total_q, Hq, D), k/v (total_k, Hkv, D) with the same dtypes, head dims and strides rules;
// cu_seqlens_* contiguous int32 (B + 1,) on q's device. lse is fp32 (Hq, total_q). The kernels
// read the sequence bounds on the device, so nothing here reads cu_seqlens' values (no host
// sync): they must run from 0, non-decreasing, to total_q / total_k, with max_seqlen_* at least
// the longest sequence (llama_kernels.ops.flash_attention_varlen checks that in eager calls).
// A sequence may be empty or have more queries than keys; a query that sees no key gets out 0,
// lse -inf and dq 0.
//
// Attention against a KV cache (inference), the append kernel and the decode kernel's KVCACHE
// specialization:
//   flash_attention_kvcache_cuda(q, k_cache, v_cache, cache_seqlens, k, v, block_table,
//                                rotary_cos, rotary_sin, rotary_interleaved, causal,
//                                softmax_scale) -> out
// with the semantics of reference.attention_with_kvcache: the new k, v (B, S_new, Hkv, D) are
// written into the caches in place at rows cache_seqlens[b] + i (k rotated when tables are
// given), q is rotated at the same positions, and each sequence attends to its
// cache_seqlens[b] + S_new keys. Caches (B, S_cache, Hkv, D), or paged (num_blocks, page, Hkv,
// D) with block_table int32 (B, max_blocks), page a power of two >= 16; unit stride along D and
// 16-byte aligned rows (they are written in place, so never copied). (Hq / Hkv) * Sq at most 64
// (the decode kernel's packed rows). Nothing here reads a device value (no host sync, so a
// CUDA graph can capture the call): the split count comes from the capacity, and the lengths
// and table entries must lie within the caches (llama_kernels.ops.flash_attention_kvcache
// checks that in eager calls).
#include "common.cuh"
#include "flash_attention_kernels.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <mutex>
#include <optional>
#include <set>
#include <tuple>

namespace llama_kernels {
namespace {

using attention::AttnParams;
using attention::Strides;

constexpr int kMaxGridYZ = 65535;

// The macros of common.cuh paste literal names; these take the name at run time.
void check_like(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == q.device(), name, ": expected device ", q.device(),
              " (that of q), got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(),
              " (that of q), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, name, ": expected 4 dimensions, got ", t.sizes());
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  LK_CHECK_CUDA(q, "q");
  LK_CHECK_DIM(q, 4, "q");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q: expected dtype float16 or bfloat16, got ", q.scalar_type());
  const int64_t d = q.size(3);
  TORCH_CHECK(d == 64 || d == 128, "q: head_dim must be 64 or 128 for the cuda backend, got ", d);
  check_like(k, q, "k");
  check_like(v, q, "v");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == d, "k: expected shape (", q.size(0),
              ", seqlen_k, heads_kv, ", d, ") to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected shape ", k.sizes(), " (that of k), got ",
              v.sizes());
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "k: the number of kv heads (",
              k.size(2), ") must divide the number of query heads (", q.size(2), ")");
  TORCH_CHECK(!causal || q.size(1) <= k.size(1), "q: causal attention needs seqlen_q <= "
              "seqlen_k, got ", q.size(1), " and ", k.size(1));
  TORCH_CHECK(q.size(0) <= kMaxGridYZ && q.size(2) <= kMaxGridYZ, "q: batch and heads must be "
              "at most ", kMaxGridYZ, ", got ", q.sizes());
  TORCH_CHECK(q.size(1) < (int64_t(1) << 30) && k.size(1) < (int64_t(1) << 30),
              "q, k: sequence lengths must be below 2**30");
  // The row kernels (delta, decode combine) launch one warp per (batch, head, query) row, 8 per
  // block: keep their grid inside 2**31 blocks.
  TORCH_CHECK(q.size(0) * q.size(1) * q.size(2) < (int64_t(1) << 33),
              "q: batch * seqlen * heads must be below 2**33, got ", q.sizes());
}

// scale * log2(e) must be finite in fp32: the kernels scale scores by it.
void check_scale(double softmax_scale) {
  TORCH_CHECK(std::isfinite(static_cast<float>(softmax_scale * M_LOG2E)),
              "softmax_scale: expected a finite value below 2.3e38, got ", softmax_scale);
}

// The kernels read rows with 16-byte cp.async: unit stride along D and 16-byte aligned rows
// ((B, S, H, D) or packed (total, H, D)).
at::Tensor rows_16b(const at::Tensor& t) {
  const int64_t last = t.dim() - 1;
  bool ok = t.stride(last) == 1 && is_aligned(t.data_ptr(), 16);
  for (int64_t i = 0; i < last; ++i) ok = ok && (t.stride(i) % 8 == 0 || t.size(i) == 1);
  // clone, not contiguous(): a contiguous tensor at a misaligned offset must move too.
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       bool causal, double softmax_scale) {
  AttnParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_s = strides_of(q), p.k_s = strides_of(k), p.v_s = strides_of(v);
  p.batch = q.size(0), p.seqlen_q = q.size(1), p.heads_q = q.size(2);
  p.seqlen_k = k.size(1), p.heads_kv = k.size(2);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  p.causal = causal;
  return p;
}

template <typename F>
void dispatch_half(at::ScalarType dtype, F&& f) {
  if (dtype == at::kHalf) return f(__half{});
  return f(__nv_bfloat16{});
}

// Opts a kernel in to `smem` bytes of dynamic shared memory on `device`, once per process (a
// driver call per launch would cost host time on every decoding step).
void allow_dynamic_smem(const void* kernel, size_t smem, int device) {
  static std::mutex mutex;
  static std::set<std::tuple<const void*, size_t, int>> done;
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count({kernel, smem, device})) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  done.insert({kernel, smem, device});
}

// Refuses, before any launch, a launch sequence (`run`: a dry run of run_forward or
// run_backward, as first_over_smem_limit takes it) with a kernel whose shared memory is over
// the device's opt-in limit per block, which the launch itself would fail with an opaque error.
template <typename Run>
void check_smem_fits(int device, int head_dim, Run&& run) {
  const size_t limit = max_smem_per_block_optin(device);
  const attention::SmemNeed over = attention::first_over_smem_limit(limit, run);
  TORCH_CHECK(over.kernel == nullptr, "flash attention (head_dim ", head_dim, "): ",
              over.kernel, " needs ", over.bytes, " bytes of shared memory per block, but device ",
              device, " allows at most ", limit, " (cudaDevAttrMaxSharedMemoryPerBlockOptin)");
}

// The launch every attention kernel goes through (run_forward / run_backward call it): opt in
// to more than 48 KiB of dynamic shared memory where the tile needs it, launch, check. The
// caller holds a guard for the tensors' device.
auto launcher(cudaStream_t stream, int device) {
  return [stream, device](const char*, auto kernel, dim3 grid, dim3 block, size_t smem,
                          const AttnParams& p) {
    if (smem > 48 * 1024) allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, device);
    kernel<<<grid, block, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
}

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_cuda(const at::Tensor& q_in,
                                                            const at::Tensor& k_in,
                                                            const at::Tensor& v_in, bool causal,
                                                            double softmax_scale) {
  check_qkv(q_in, k_in, v_in, causal);
  check_scale(softmax_scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_16b(q_in), k = rows_16b(k_in), v = rows_16b(v_in);
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({b, hq, sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (k.size(1) == 0) return {out.zero_(), lse.fill_(-INFINITY)};  // no key: as the reference
  AttnParams p = make_params(q, k, v, causal, softmax_scale);
  p.o = out.data_ptr(), p.o_s = strides_of(out), p.lse = lse.data_ptr<float>();
  p.num_splits = attention::decode_splits(p, num_sms(q.get_device()));
  at::Tensor o_partial, lse_partial;  // the decode kernel's per-split results
  if (p.num_splits > 1) {
    o_partial = at::empty({p.num_splits, b, hq, sq, q.size(3)}, lse.options());
    lse_partial = at::empty({p.num_splits, b, hq, sq}, lse.options());
    p.o_partial = o_partial.data_ptr<float>(), p.lse_partial = lse_partial.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_half(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const int d = q.size(3), device = q.get_device();
    check_smem_fits(device, d, [&](auto&& dry) { attention::run_forward<T>(p, d, dry); });
    attention::run_forward<T>(p, d, launcher(stream, device));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse, bool causal,
    double softmax_scale) {
  check_qkv(q_in, k_in, v_in, causal);
  check_scale(softmax_scale);
  for (const auto& [t, name] : {std::pair{&dout_in, "dout"}, std::pair{&out_in, "out"}}) {
    check_like(*t, q_in, name);
    TORCH_CHECK(t->sizes() == q_in.sizes(), name, ": expected shape ", q_in.sizes(),
                " (that of q), got ", t->sizes());
  }
  LK_CHECK_CUDA(lse, "lse");
  LK_CHECK_SAME_DEVICE(lse, q_in, "lse", "q");
  LK_CHECK_DTYPE(lse, at::kFloat, "lse");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q_in.size(0) && lse.size(1) == q_in.size(2) &&
                  lse.size(2) == q_in.size(1),
              "lse: expected shape (batch, heads_q, seqlen_q) = (", q_in.size(0), ", ",
              q_in.size(2), ", ", q_in.size(1), "), got ", lse.sizes());
  LK_CHECK_CONTIGUOUS(lse, "lse");

  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_16b(q_in), k = rows_16b(k_in), v = rows_16b(v_in);
  const at::Tensor dout = rows_16b(dout_in), out = rows_16b(out_in);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (dk.numel() == 0) return {dq.zero_(), dk, dv};
  if (dq.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  AttnParams p = make_params(q, k, v, causal, softmax_scale);
  p.out = out.data_ptr(), p.dout = dout.data_ptr();
  p.out_s = strides_of(out), p.dout_s = strides_of(dout);
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.dq_s = strides_of(dq), p.dk_s = strides_of(dk), p.dv_s = strides_of(dv);
  p.lse = lse.data_ptr<float>(), p.delta = delta.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_half(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const int d = q.size(3), device = q.get_device();
    check_smem_fits(device, d, [&](auto&& dry) { attention::run_backward<T>(p, d, dry); });
    attention::run_backward<T>(p, d, launcher(stream, device));
  });
  return {dq, dk, dv};
}

// ------------------------------------------------------------------------------ packed

void check_packed_like(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == q.device(), name, ": expected device ", q.device(),
              " (that of q), got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(),
              " (that of q), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3, name, ": expected 3 dimensions (total_rows, heads, head_dim), got ",
              t.sizes());
}

void check_cu_seqlens(const at::Tensor& cu, const at::Tensor& q, const char* name,
                      int64_t entries) {
  TORCH_CHECK(cu.is_cuda() && cu.device() == q.device(), name, ": expected a tensor on ",
              q.device(), " (that of q), got one on ", cu.device());
  TORCH_CHECK(cu.scalar_type() == at::kInt, name, ": expected dtype int32, got ",
              cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1 && cu.is_contiguous(), name,
              ": expected a contiguous (batch + 1,) tensor, got shape ", cu.sizes(),
              " and strides ", cu.strides());
  TORCH_CHECK(entries < 0 || cu.size(0) == entries, name, ": expected shape (", entries,
              ",) (that of cu_seqlens_q), got ", cu.sizes());
}

// Shapes, dtypes, devices and sizes of a packed call; the values of cu_seqlens are the caller's
// (see the top of this file).
void check_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k) {
  LK_CHECK_CUDA(q, "q");
  TORCH_CHECK(q.dim() == 3, "q: expected 3 dimensions (total_q, heads_q, head_dim), got ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q: expected dtype float16 or bfloat16, got ", q.scalar_type());
  const int64_t d = q.size(2);
  TORCH_CHECK(d == 64 || d == 128, "q: head_dim must be 64 or 128 for the cuda backend, got ", d);
  check_packed_like(k, q, "k");
  check_packed_like(v, q, "v");
  TORCH_CHECK(k.size(2) == d, "k: expected shape (total_k, heads_kv, ", d, ") to match q ",
              q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v: expected shape ", k.sizes(), " (that of k), got ",
              v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "k: the number of kv heads (",
              k.size(1), ") must divide the number of query heads (", q.size(1), ")");
  check_cu_seqlens(cu_q, q, "cu_seqlens_q", -1);
  check_cu_seqlens(cu_k, q, "cu_seqlens_k", cu_q.size(0));
  const int64_t batch = cu_q.size(0) - 1;
  TORCH_CHECK(batch <= kMaxGridYZ && q.size(1) <= kMaxGridYZ, "q: batch (", batch,
              ") and heads (", q.size(1), ") must be at most ", kMaxGridYZ);
  // cu_seqlens are int32: every packed row index fits.
  TORCH_CHECK(q.size(0) <= INT32_MAX && k.size(0) <= INT32_MAX,
              "q, k: packed lengths must fit int32 (cu_seqlens), got ", q.size(0), " and ",
              k.size(0));
  for (const auto& [n, total, name] : {std::tuple{max_q, q.size(0), "max_seqlen_q"},
                                       std::tuple{max_k, k.size(0), "max_seqlen_k"}}) {
    TORCH_CHECK(n >= 0 && n < (int64_t(1) << 30), name, ": expected a length in [0, 2**30), got ",
                n);
    // Rows exist, so a sequence does: the grid sized by the longest must not be empty.
    TORCH_CHECK(n > 0 || total == 0, name, ": expected at least the longest sequence, got 0 "
                "with ", total, " packed rows");
  }
  TORCH_CHECK(batch > 0 || q.size(0) + k.size(0) == 0, "cu_seqlens_q: expected at least one "
              "sequence for ", q.size(0), " query and ", k.size(0), " key rows");
  // delta's row kernel launches one warp per (head, packed query), 8 per block.
  TORCH_CHECK(q.size(0) * q.size(1) < (int64_t(1) << 33),
              "q: total_q * heads must be below 2**33, got ", q.sizes());
}

Strides packed_strides(const at::Tensor& t) { return {0, t.stride(0), t.stride(1)}; }

AttnParams make_packed_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                              int64_t max_k, bool causal, double softmax_scale) {
  AttnParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_s = packed_strides(q), p.k_s = packed_strides(k), p.v_s = packed_strides(v);
  p.batch = cu_q.size(0) - 1, p.heads_q = q.size(1), p.heads_kv = k.size(1);
  p.seqlen_q = max_q, p.seqlen_k = max_k;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  p.causal = causal;
  p.num_splits = 0;  // no decode path: the prefill kernel runs every query count
  p.cu_seqlens_q = cu_q.data_ptr<int>(), p.cu_seqlens_k = cu_k.data_ptr<int>();
  p.total_q = q.size(0);
  return p;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_varlen_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double softmax_scale) {
  check_packed(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_scale(softmax_scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_16b(q_in), k = rows_16b(k_in), v = rows_16b(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (k.size(0) == 0) return {out.zero_(), lse.fill_(-INFINITY)};  // no sequence has a key
  AttnParams p = make_packed_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, causal, softmax_scale);
  p.o = out.data_ptr(), p.o_s = packed_strides(out), p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_half(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const int d = q.size(2), device = q.get_device();
    check_smem_fits(device, d, [&](auto&& dry) { attention::run_forward<T>(p, d, dry); });
    attention::run_forward<T>(p, d, launcher(stream, device));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_varlen_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double softmax_scale) {
  check_packed(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_scale(softmax_scale);
  for (const auto& [t, name] : {std::pair{&dout_in, "dout"}, std::pair{&out_in, "out"}}) {
    check_packed_like(*t, q_in, name);
    TORCH_CHECK(t->sizes() == q_in.sizes(), name, ": expected shape ", q_in.sizes(),
                " (that of q), got ", t->sizes());
  }
  LK_CHECK_CUDA(lse, "lse");
  LK_CHECK_SAME_DEVICE(lse, q_in, "lse", "q");
  LK_CHECK_DTYPE(lse, at::kFloat, "lse");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q_in.size(1) && lse.size(1) == q_in.size(0),
              "lse: expected shape (heads_q, total_q) = (", q_in.size(1), ", ", q_in.size(0),
              "), got ", lse.sizes());
  LK_CHECK_CONTIGUOUS(lse, "lse");

  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_16b(q_in), k = rows_16b(k_in), v = rows_16b(v_in);
  const at::Tensor dout = rows_16b(dout_in), out = rows_16b(out_in);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (dk.numel() == 0) return {dq.zero_(), dk, dv};
  if (dq.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  AttnParams p = make_packed_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, causal, softmax_scale);
  p.out = out.data_ptr(), p.dout = dout.data_ptr();
  p.out_s = packed_strides(out), p.dout_s = packed_strides(dout);
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.dq_s = packed_strides(dq), p.dk_s = packed_strides(dk), p.dv_s = packed_strides(dv);
  p.lse = lse.data_ptr<float>(), p.delta = delta.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_half(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const int d = q.size(2), device = q.get_device();
    check_smem_fits(device, d, [&](auto&& dry) { attention::run_backward<T>(p, d, dry); });
    attention::run_backward<T>(p, d, launcher(stream, device));
  });
  return {dq, dk, dv};
}

// ------------------------------------------------------------------------------ KV cache

void check_int32(const at::Tensor& t, const at::Tensor& q, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), name, ": expected a tensor on ",
              q.device(), " (that of q), got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, ": expected ", dim, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.size(0) == q.size(0), name, ": expected ", q.size(0), " rows (the batch of q), "
              "got shape ", t.sizes());
}

// Caches are written in place: they must already have the layout the kernels read.
void check_cache(const at::Tensor& c, const at::Tensor& q, const char* name) {
  check_like(c, q, name);
  TORCH_CHECK(c.size(3) == q.size(3), name, ": expected head_dim ", q.size(3), " (that of q), "
              "got shape ", c.sizes());
  TORCH_CHECK(rows_16b(c).is_same(c), name, ": expected unit stride along head_dim and 16-byte "
              "aligned rows (the cache is written in place), got strides ", c.strides());
}

at::Tensor flash_attention_kvcache_cuda(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens_in, const std::optional<at::Tensor>& k_in,
    const std::optional<at::Tensor>& v_in, const std::optional<at::Tensor>& block_table_in,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
    bool rotary_interleaved, bool causal, double softmax_scale) {
  LK_CHECK_CUDA(q_in, "q");
  LK_CHECK_DIM(q_in, 4, "q");
  TORCH_CHECK(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16,
              "q: expected dtype float16 or bfloat16, got ", q_in.scalar_type());
  const int64_t batch = q_in.size(0), sq = q_in.size(1), hq = q_in.size(2), d = q_in.size(3);
  TORCH_CHECK(d == 64 || d == 128, "q: head_dim must be 64 or 128 for the cuda backend, got ", d);
  check_cache(k_cache, q_in, "k_cache");
  check_cache(v_cache, q_in, "v_cache");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache: expected shape ", k_cache.sizes(),
              " (that of k_cache), got ", v_cache.sizes());
  const int64_t hkv = k_cache.size(2), rows = k_cache.size(1);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "k_cache: the number of kv heads (", hkv,
              ") must divide the number of query heads (", hq, ")");
  TORCH_CHECK((hq / hkv) * sq <= attention::kDecodeMaxRows, "q: (heads_q / heads_kv) * seqlen_q "
              "must be at most ", attention::kDecodeMaxRows, " for the cuda backend, got ",
              (hq / hkv) * sq);
  TORCH_CHECK(batch <= kMaxGridYZ && hkv <= kMaxGridYZ, "q: batch and kv heads must be at most ",
              kMaxGridYZ, ", got ", q_in.sizes());
  check_int32(cache_seqlens_in, q_in, "cache_seqlens", 1);
  at::Tensor block_table;
  int64_t capacity = rows;
  int page_shift = 0;
  if (block_table_in.has_value()) {
    check_int32(*block_table_in, q_in, "block_table", 2);
    TORCH_CHECK(rows >= 16 && (rows & (rows - 1)) == 0, "k_cache: expected a block size "
                "(dimension 1) that is a power of two >= 16 with a block_table, got ", rows);
    block_table = block_table_in->contiguous();
    capacity = rows * block_table.size(1);
    while ((int64_t(1) << page_shift) < rows) ++page_shift;
  } else {
    TORCH_CHECK(k_cache.size(0) == batch, "k_cache: expected batch ", batch, " (that of q) "
                "without a block_table, got shape ", k_cache.sizes());
  }
  TORCH_CHECK(k_in.has_value() == v_in.has_value(), "k, v: expected both new keys and values, "
              "or neither");
  int64_t s_new = 0;
  if (k_in.has_value()) {
    check_like(*k_in, q_in, "k");
    TORCH_CHECK(k_in->size(0) == batch && k_in->size(2) == hkv && k_in->size(3) == d,
                "k: expected shape (", batch, ", S_new, ", hkv, ", ", d, "), got ",
                k_in->sizes());
    check_like(*v_in, q_in, "v");
    TORCH_CHECK(v_in->sizes() == k_in->sizes(), "v: expected shape ", k_in->sizes(),
                " (that of k), got ", v_in->sizes());
    s_new = k_in->size(1);
  }
  TORCH_CHECK(rotary_cos.has_value() == rotary_sin.has_value(), "rotary_cos, rotary_sin: "
              "expected both tables, or neither");
  at::Tensor cos, sin;
  if (rotary_cos.has_value()) {
    for (const auto& [t, name] : {std::pair{&*rotary_cos, "rotary_cos"},
                                  std::pair{&*rotary_sin, "rotary_sin"}}) {
      TORCH_CHECK(t->is_cuda() && t->device() == q_in.device(), name, ": expected a tensor on ",
                  q_in.device(), " (that of q), got one on ", t->device());
      TORCH_CHECK(t->dim() == 2 && t->size(1) == d / 2, name, ": expected shape (rows, ", d / 2,
                  "), got ", t->sizes());
    }
    TORCH_CHECK(rotary_sin->sizes() == rotary_cos->sizes(), "rotary_sin: expected shape ",
                rotary_cos->sizes(), " (that of rotary_cos), got ", rotary_sin->sizes());
  }
  TORCH_CHECK(capacity + sq < (int64_t(1) << 30), "k_cache: capacity must be below 2**30, got ",
              capacity);
  check_scale(softmax_scale);

  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty(q_in.sizes(), q_in.options());
  if (batch == 0) return out;
  const bool rotary = rotary_cos.has_value();
  if (rotary) {  // the kernels read fp32 tables with unit stride along D / 2
    cos = rotary_cos->to(at::kFloat).contiguous();
    sin = rotary_sin->to(at::kFloat).contiguous();
  }
  const at::Tensor q = rows_16b(q_in);
  const at::Tensor seqlens = cache_seqlens_in.contiguous();
  const at::Tensor k = s_new ? k_in->contiguous() : at::Tensor();
  const at::Tensor v = s_new ? v_in->contiguous() : at::Tensor();
  AttnParams p = make_params(q, k_cache, v_cache, causal, softmax_scale);
  p.seqlen_k = static_cast<int>(capacity);
  p.seqlen_new = static_cast<int>(s_new);
  p.k_cache = k_cache.data_ptr(), p.v_cache = v_cache.data_ptr();
  p.cache_seqlens = seqlens.data_ptr<int>();
  if (block_table.defined()) {
    p.block_table = block_table.data_ptr<int>();
    p.block_table_stride = block_table.stride(0);
    p.page_shift = page_shift;
  }
  if (s_new) {
    p.k_new = k.data_ptr(), p.v_new = v.data_ptr();
    p.k_new_s = strides_of(k), p.v_new_s = strides_of(v);
  }
  at::Tensor q_rot;
  if (rotary) {
    q_rot = at::empty(q.sizes(), q.options());
    p.q_rot = q_rot.data_ptr(), p.q_rot_s = strides_of(q_rot);
    p.rotary_cos = cos.data_ptr<float>(), p.rotary_sin = sin.data_ptr<float>();
    p.rotary_stride = cos.stride(0);
    p.rotary_interleaved = rotary_interleaved;
  }
  if (capacity == 0) return out.zero_();  // no key in any sequence, nothing to append
  at::Tensor lse = at::empty({batch, hq, sq}, q.options().dtype(at::kFloat));
  p.o = out.data_ptr(), p.o_s = strides_of(out), p.lse = lse.data_ptr<float>();
  p.num_splits = attention::decode_splits(p, num_sms(q.get_device()));
  at::Tensor o_partial, lse_partial;
  if (p.num_splits > 1) {
    o_partial = at::empty({p.num_splits, batch, hq, sq, d}, lse.options());
    lse_partial = at::empty({p.num_splits, batch, hq, sq}, lse.options());
    p.o_partial = o_partial.data_ptr<float>(), p.lse_partial = lse_partial.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_half(q.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const int device = q.get_device();
    check_smem_fits(device, d, [&](auto&& dry) { attention::run_kvcache<T>(p, d, dry); });
    attention::run_kvcache<T>(p, d, launcher(stream, device));
  });
  return out;
}

}  // namespace
}  // namespace llama_kernels

TORCH_LIBRARY_IMPL(llama_kernels, CUDA, m) {
  m.impl("flash_attention_fwd_cuda", &llama_kernels::flash_attention_fwd_cuda);
  m.impl("flash_attention_bwd_cuda", &llama_kernels::flash_attention_bwd_cuda);
  m.impl("flash_attention_varlen_fwd_cuda", &llama_kernels::flash_attention_varlen_fwd_cuda);
  m.impl("flash_attention_varlen_bwd_cuda", &llama_kernels::flash_attention_varlen_bwd_cuda);
  m.impl("flash_attention_kvcache_cuda", &llama_kernels::flash_attention_kvcache_cuda);
}
