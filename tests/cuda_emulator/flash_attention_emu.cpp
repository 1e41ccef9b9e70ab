// extern "C" entry points running the attention kernels (csrc/flash_attention_kernels.cuh and
// the headers it includes) on the host emulator, for flash_forward / flash_backward and their
// packed-sequence twins flash_varlen_forward / flash_varlen_backward in
// tests/cuda_emulator/__init__.py, and flash_kvcache (attention against a KV cache). The launch
// decisions are the header's (run_forward / run_backward / run_kvcache); this file only fills
// AttnParams and launches.
#include "emulator.h"
#include "flash_attention_kernels.cuh"

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace attn = llama_kernels::attention;

constexpr double kLog2e = 1.4426950408889634;
// A small GPU, so that short KV caches already split (decode_splits aims at 2 blocks per SM).
constexpr int kEmulatedSms = 8;

attn::Strides strides_at(const int64_t* s, int i) { return {s[3 * i], s[3 * i + 1], s[3 * i + 2]}; }

// sizes: batch, heads_q, heads_kv, seqlen_q, seqlen_k.
attn::AttnParams base_params(const int* sizes, float softmax_scale, int causal) {
  attn::AttnParams p{};
  p.batch = sizes[0];
  p.heads_q = sizes[1];
  p.heads_kv = sizes[2];
  p.seqlen_q = sizes[3];
  p.seqlen_k = sizes[4];
  p.softmax_scale = softmax_scale;
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  p.causal = causal != 0;
  return p;
}

// Set by emu_skip_empty_grids: a launch with an empty grid does nothing instead of failing as
// it would in CUDA, so a test can run the backward on seqlen_q == 0, where only the dK/dV
// kernel has blocks.
bool skip_empty_grids = false;

// Set by emu_check_smem_before_launch(0): skip the launcher's check of shared memory, so that
// a test sees the emulated launch itself refuse a block over the device's limit.
bool check_smem_first = true;

const auto emu_launch = [](const char*, auto kernel, dim3 grid, dim3 block, size_t smem_bytes,
                           const attn::AttnParams& p) {
  if (skip_empty_grids && (grid.x == 0 || grid.y == 0 || grid.z == 0)) return;
  emu::launch(kernel, grid, block, smem_bytes, p);
};

// flash_attention.cu's check_smem_fits against the emulated device's limit: every launch of
// `run` (a dry run of run_forward / run_backward) fits, else the same message, before any launch.
template <typename Run>
void check_smem_fits(int head_dim, Run&& run) {
  if (!check_smem_first) return;
  const size_t limit = emu::max_smem_per_block();
  const attn::SmemNeed over = attn::first_over_smem_limit(limit, run);
  if (over.kernel != nullptr) {
    throw std::runtime_error("flash attention (head_dim " + std::to_string(head_dim) + "): " +
                             over.kernel + " needs " + std::to_string(over.bytes) +
                             " bytes of shared memory per block, but device 0 allows at most " +
                             std::to_string(limit) + " (cudaDevAttrMaxSharedMemoryPerBlockOptin)");
  }
}

}  // namespace

extern "C" {

// Global ranges the kernels may cp.async from; call_c drops them when a call returns.
void emu_register_global(const void* ptr, size_t bytes) { emu::register_global(ptr, bytes); }
void emu_clear_globals() { emu::clear_globals(); }
void emu_skip_empty_grids(int skip) { skip_empty_grids = skip != 0; }
void emu_check_smem_before_launch(int check) { check_smem_first = check != 0; }

// strides: (q, k, v, o) x (batch, row, head), in elements.
int flash_forward_emu(int dtype, int head_dim, const void* q, const void* k, const void* v,
                      void* o, float* lse, const int64_t* strides, const int* sizes,
                      float softmax_scale, int causal, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    attn::AttnParams p = base_params(sizes, softmax_scale, causal);
    p.q = q;
    p.k = k;
    p.v = v;
    p.o = o;
    p.lse = lse;
    p.q_s = strides_at(strides, 0);
    p.k_s = strides_at(strides, 1);
    p.v_s = strides_at(strides, 2);
    p.o_s = strides_at(strides, 3);
    // The decode kernel's split count as for a GPU of kEmulatedSms multiprocessors; its
    // per-split scratch NaN until written.
    p.num_splits = attn::decode_splits(p, kEmulatedSms);
    const size_t rows = size_t(p.batch) * p.heads_q * p.seqlen_q;
    std::vector<float> o_partial, lse_partial;
    if (p.num_splits > 1) {
      o_partial.assign(p.num_splits * rows * head_dim, std::numeric_limits<float>::quiet_NaN());
      lse_partial.assign(p.num_splits * rows, std::numeric_limits<float>::quiet_NaN());
      emu::register_global(o_partial.data(), o_partial.size() * sizeof(float));
      emu::register_global(lse_partial.data(), lse_partial.size() * sizeof(float));
      p.o_partial = o_partial.data();
      p.lse_partial = lse_partial.data();
    }
    emu::with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      check_smem_fits(head_dim, [&](auto&& dry) { attn::run_forward<T>(p, head_dim, dry); });
      attn::run_forward<T>(p, head_dim, emu_launch);
    });
  });
}

// strides: (q, k, v, out, dout, dq, dk, dv) x (batch, row, head), in elements.
int flash_backward_emu(int dtype, int head_dim, const void* q, const void* k, const void* v,
                       const void* out, const void* dout, const float* lse, void* dq, void* dk,
                       void* dv, const int64_t* strides, const int* sizes, float softmax_scale,
                       int causal, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    attn::AttnParams p = base_params(sizes, softmax_scale, causal);
    // rowsum(dout * out) scratch, NaN until the backward's first kernel fills it.
    std::vector<float> delta(size_t(p.batch) * p.heads_q * p.seqlen_q,
                             std::numeric_limits<float>::quiet_NaN());
    emu::register_global(delta.data(), delta.size() * sizeof(float));
    p.q = q;
    p.k = k;
    p.v = v;
    p.out = out;
    p.dout = dout;
    p.lse = const_cast<float*>(lse);
    p.delta = delta.data();
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    p.q_s = strides_at(strides, 0);
    p.k_s = strides_at(strides, 1);
    p.v_s = strides_at(strides, 2);
    p.out_s = strides_at(strides, 3);
    p.dout_s = strides_at(strides, 4);
    p.dq_s = strides_at(strides, 5);
    p.dk_s = strides_at(strides, 6);
    p.dv_s = strides_at(strides, 7);
    emu::with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      check_smem_fits(head_dim, [&](auto&& dry) { attn::run_backward<T>(p, head_dim, dry); });
      attn::run_backward<T>(p, head_dim, emu_launch);
    });
  });
}

// Packed sequences (the kernels' VARLEN specializations): q (total_q, Hq, D), k and v
// (total_k, Hkv, D), cu_seqlens_q / cu_seqlens_k int32 (batch + 1); sizes: batch, heads_q,
// heads_kv, max_seqlen_q, max_seqlen_k, total_q; strides as for flash_forward_emu, with batch
// strides 0. lse (Hq, total_q).
int flash_varlen_forward_emu(int dtype, int head_dim, const void* q, const void* k,
                             const void* v, void* o, float* lse, const int* cu_seqlens_q,
                             const int* cu_seqlens_k, const int64_t* strides, const int* sizes,
                             float softmax_scale, int causal, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    attn::AttnParams p = base_params(sizes, softmax_scale, causal);
    p.cu_seqlens_q = cu_seqlens_q;
    p.cu_seqlens_k = cu_seqlens_k;
    p.total_q = sizes[5];
    p.q = q;
    p.k = k;
    p.v = v;
    p.o = o;
    p.lse = lse;
    p.q_s = strides_at(strides, 0);
    p.k_s = strides_at(strides, 1);
    p.v_s = strides_at(strides, 2);
    p.o_s = strides_at(strides, 3);
    p.num_splits = 0;  // packed sequences run the prefill kernel at every query count
    emu::with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      check_smem_fits(head_dim, [&](auto&& dry) { attn::run_forward<T>(p, head_dim, dry); });
      attn::run_forward<T>(p, head_dim, emu_launch);
    });
  });
}

// The packed backward; arguments as flash_backward_emu's plus those of flash_varlen_forward_emu.
int flash_varlen_backward_emu(int dtype, int head_dim, const void* q, const void* k,
                              const void* v, const void* out, const void* dout, const float* lse,
                              void* dq, void* dk, void* dv, const int* cu_seqlens_q,
                              const int* cu_seqlens_k, const int64_t* strides, const int* sizes,
                              float softmax_scale, int causal, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    attn::AttnParams p = base_params(sizes, softmax_scale, causal);
    p.cu_seqlens_q = cu_seqlens_q;
    p.cu_seqlens_k = cu_seqlens_k;
    p.total_q = sizes[5];
    // rowsum(dout * out) scratch (Hq, total_q), NaN until the backward's first kernel fills it.
    std::vector<float> delta(size_t(p.heads_q) * p.total_q,
                             std::numeric_limits<float>::quiet_NaN());
    emu::register_global(delta.data(), delta.size() * sizeof(float));
    p.q = q;
    p.k = k;
    p.v = v;
    p.out = out;
    p.dout = dout;
    p.lse = const_cast<float*>(lse);
    p.delta = delta.data();
    p.dq = dq;
    p.dk = dk;
    p.dv = dv;
    p.q_s = strides_at(strides, 0);
    p.k_s = strides_at(strides, 1);
    p.v_s = strides_at(strides, 2);
    p.out_s = strides_at(strides, 3);
    p.dout_s = strides_at(strides, 4);
    p.dq_s = strides_at(strides, 5);
    p.dk_s = strides_at(strides, 6);
    p.dv_s = strides_at(strides, 7);
    emu::with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      check_smem_fits(head_dim, [&](auto&& dry) { attn::run_backward<T>(p, head_dim, dry); });
      attn::run_backward<T>(p, head_dim, emu_launch);
    });
  });
}

// Attention against a KV cache (run_kvcache: append, decode, combine), as flash_attention.cu's
// flash_attention_kvcache_cuda launches it. q (B, Sq, Hq, D); k_cache, v_cache (B, S_cache, Hkv,
// D), or paged pools (num_blocks, page_size, Hkv, D) with block_table int32 (B, max_blocks)
// rows block_table_stride apart; cache_seqlens int32 (B,); k_new, v_new (B, S_new, Hkv, D) or
// null with S_new 0; cos, sin fp32 (rows, D / 2) contiguous or null. The caches are written in
// place. sizes: batch, heads_q, heads_kv, seqlen_q, capacity (S_cache, or max_blocks *
// page_size), seqlen_new, page_size (0: contiguous); strides: (q, k_cache, v_cache, o, k_new,
// v_new) x (batch, row, head), in elements.
int flash_kvcache_emu(int dtype, int head_dim, const void* q, void* k_cache, void* v_cache,
                      const int* cache_seqlens, const void* k_new, const void* v_new,
                      const int* block_table, int64_t block_table_stride, const float* cos,
                      const float* sin, void* o, const int64_t* strides, const int* sizes,
                      float softmax_scale, int causal, int interleaved, char* err,
                      size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    attn::AttnParams p = base_params(sizes, softmax_scale, causal);
    p.seqlen_new = sizes[5];
    const int page_size = sizes[6];
    p.q = q;
    p.k = k_cache;
    p.v = v_cache;
    p.k_cache = k_cache;
    p.v_cache = v_cache;
    p.k_new = k_new;
    p.v_new = v_new;
    p.o = o;
    p.q_s = strides_at(strides, 0);
    p.k_s = strides_at(strides, 1);
    p.v_s = strides_at(strides, 2);
    p.o_s = strides_at(strides, 3);
    p.k_new_s = strides_at(strides, 4);
    p.v_new_s = strides_at(strides, 5);
    p.cache_seqlens = cache_seqlens;
    p.block_table = page_size ? block_table : nullptr;
    p.block_table_stride = block_table_stride;
    p.page_shift = 0;
    while (page_size && (1 << p.page_shift) < page_size) ++p.page_shift;
    p.rotary_cos = cos;
    p.rotary_sin = sin;
    p.rotary_stride = head_dim / 2;
    p.rotary_interleaved = interleaved != 0;
    // Scratch as flash_attention.cu allocates it, NaN until written: the rotated q, lse and the
    // per-split partials (split count as for a GPU of kEmulatedSms multiprocessors).
    const size_t rows = size_t(p.batch) * p.heads_q * p.seqlen_q;
    std::vector<float> lse(rows, std::numeric_limits<float>::quiet_NaN());
    std::vector<uint16_t> q_rot(cos != nullptr ? rows * head_dim : 0, 0x7fff);
    emu::register_global(lse.data(), lse.size() * sizeof(float));
    p.lse = lse.data();
    if (cos != nullptr) {
      emu::register_global(q_rot.data(), q_rot.size() * sizeof(uint16_t));
      p.q_rot = q_rot.data();
      p.q_rot_s = {int64_t(p.seqlen_q) * p.heads_q * head_dim, int64_t(p.heads_q) * head_dim,
                   head_dim};
    }
    p.num_splits = attn::decode_splits(p, kEmulatedSms);
    std::vector<float> o_partial, lse_partial;
    if (p.num_splits > 1) {
      o_partial.assign(p.num_splits * rows * head_dim, std::numeric_limits<float>::quiet_NaN());
      lse_partial.assign(p.num_splits * rows, std::numeric_limits<float>::quiet_NaN());
      emu::register_global(o_partial.data(), o_partial.size() * sizeof(float));
      emu::register_global(lse_partial.data(), lse_partial.size() * sizeof(float));
      p.o_partial = o_partial.data();
      p.lse_partial = lse_partial.data();
    }
    emu::with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      check_smem_fits(head_dim, [&](auto&& dry) { attn::run_kvcache<T>(p, head_dim, dry); });
      attn::run_kvcache<T>(p, head_dim, emu_launch);
    });
  });
}

}  // extern "C"
