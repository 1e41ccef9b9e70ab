// Flash attention on tensor cores (FlashAttention-2 structure), forward and backward, for
// head_dim 64 and 128, fp16 and bf16, sm_80 and later: the one header both callers include.
// It holds the launch decisions (tiles per head dim, grids, blocks, shared memory, decode key
// splits); the kernels are in
//   flash_attention_common.cuh  AttnParams, tile arithmetic, swizzled tile loads, softmax step
//   flash_fwd_kernels.cuh       O = softmax(scale Q K^T + mask) V and lse, one query block a block
//   flash_decode_kernels.cuh    the same for few queries: split-KV decode and the merge of splits
//   kvcache_append_kernels.cuh  new keys and values into a KV cache (rotated), q rotated
//   flash_bwd_kernels.cuh       delta = rowsum(dO o O), then dK, dV and dQ
//
// Kernel source only: no torch, no launches of its own. flash_attention.cu launches these with
// CUDA; tests/cuda_emulator runs the very same source on the host against an emulation of
// tensor_core.cuh. Every launch decision is made here, in run_forward / run_backward, so both
// callers launch identically. The launch interface each caller provides:
// launch(name, kernel, grid, block, smem_bytes, params) runs `kernel` (a `void (*)(AttnParams)`
// __global__ function, `name` its name for messages) and checks the launch. Before launching,
// the callers check every launch's shared memory against the device's per-block limit with
// first_over_smem_limit, so that a launch sequence that cannot run starts none of its kernels.
//   template <typename T, typename Launch>
//   void run_forward(const AttnParams& p, int head_dim, Launch&& launch);   // writes o, lse
//   template <typename T, typename Launch>
//   void run_backward(const AttnParams& p, int head_dim, Launch&& launch);  // dq, dk, dv
//   template <typename T, typename Launch>
//   void run_kvcache(const AttnParams& p, int head_dim, Launch&& launch);   // caches, o, lse
// T is __half or __nv_bfloat16; head_dim is 64 or 128 (others are refused by the callers).
// Packed sequences (p.cu_seqlens_q set) launch the kernels' VARLEN specializations on the same
// grids, sized by the longest sequences (p.seqlen_q, p.seqlen_k), and never the decode kernel.
// Preconditions (the callers check them): the conventions of flash_attention_common.cuh,
// seqlen_q <= seqlen_k when causal (dense), batch and heads_q at most 65535 (grid y and z), and
// for the forward p.num_splits from decode_splits (0 when packed). flash_attention.cu returns
// before any launch when q or k is empty.
#pragma once

#include "flash_attention_common.cuh"
#include "flash_bwd_kernels.cuh"
#include "flash_decode_kernels.cuh"
#include "flash_fwd_kernels.cuh"
#include "kvcache_append_kernels.cuh"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

namespace llama_kernels {
namespace attention {

// ------------------------------------------------------------------------------ tiles
//
// Tile choices start from FlashAttention-2's for sm_80 (at d128: 128 queries x 64 keys on 4
// warps) and are bounded by the register file: 255 registers per thread at 128 threads, and
// tests/test_cuda_build.py checks from the cubin that no kernel spills. Each warp owns 16 rows
// (x MT) and holds their fp32 accumulators: O (D/2 regs per m16 tile) plus the scores
// (BLOCK_N/2); the backward holds two D-wide accumulators (dK and dV) and two score tiles.
// Alternatives measured with ptxas (nvcc 13.0, sm_80 / sm_90) are noted where they lose.
//   forward  d64: 128 x 64, 4 warps (2 m16 tiles each), 32 KiB of shared memory.
//            d128: 128 x 64, 8 warps (64 KiB); 4 warps with 2 m16 tiles each hit 255
//            registers and spill 28 / 80 bytes.
//   dK/dV    64 keys (4 warps) x 64-query steps at d64 (49 KiB); 32-query steps at d128
//            (64.5 KiB), where 64-query steps need all 255 registers (no spill, no headroom).
//   dQ       64 queries (4 warps) x 64-key steps (d64 49 KiB, d128 97 KiB).
//   decode   DecodeTile: 16, 32 or 64 packed query rows (1, 2 or 4 m16 tiles, each on 4, 2 or
//            1 warps) x 64-key stages, 4 warps (d64 34 / 36 / 40 KiB, d128 68 / 72 / 80 KiB).
template <int D>
struct AttentionLaunch;
template <>
struct AttentionLaunch<64> {
  using Fwd = FwdTile<64, 128, 64, 4>;
  using Dkdv = BwdTile<64, 64, 4>;
  using Dq = BwdTile<64, 64, 4>;
};
template <>
struct AttentionLaunch<128> {
  using Fwd = FwdTile<128, 128, 64, 8>;
  using Dkdv = BwdTile<128, 32, 4>;
  using Dq = BwdTile<128, 64, 4>;
};

// Key splits for a decode launch: 0 (use the prefill kernel) unless every query head of a kv
// group and its queries fit kDecodeMaxRows packed rows (4 m16 tiles); else enough splits for
// two blocks per SM, but at least 4 stages (256 keys) per split, and no empty split. A block
// costs the same 4 warps and K/V stages whatever its row tiles, so the split count does not
// depend on them.
inline int decode_splits(const AttnParams& p, int num_sms) {
  const int group = p.heads_q / p.heads_kv;
  const int stages = ceil_div(p.seqlen_k, 64);
  if (int64_t(group) * p.seqlen_q > kDecodeMaxRows || stages == 0) return 0;
  const int64_t blocks = int64_t(p.batch) * p.heads_kv;
  int64_t splits = (2 * int64_t(num_sms) + blocks - 1) / blocks;
  const int64_t most = ceil_div(stages, 4);
  splits = splits < most ? splits : most;
  splits = splits < 1 ? 1 : splits;
  const int per_split = ceil_div(stages, int(splits));
  return ceil_div(stages, per_split);
}

template <typename F>
void with_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 64: return f(AttentionLaunch<64>{});
    case 128: return f(AttentionLaunch<128>{});
    default: throw std::invalid_argument("flash attention: head_dim must be 64 or 128");
  }
}

// Calls f(std::true_type{}) for packed sequences (p.cu_seqlens_q set), else f(std::false_type{}):
// the VARLEN flag of the kernels to launch.
template <typename F>
void with_varlen(const AttnParams& p, F&& f) {
  if (p.cu_seqlens_q != nullptr) return f(std::true_type{});
  return f(std::false_type{});
}

// p.num_splits from decode_splits: 0 runs the prefill kernel, else the decode kernel (and the
// combine kernel when there are several splits; the caller allocates o_partial, lse_partial).
// Packed sequences take the prefill kernel at every query count (num_splits 0).
template <typename T, typename Launch>
void run_forward(const AttnParams& p, int head_dim, Launch&& launch) {
  if (p.cu_seqlens_q != nullptr && p.num_splits != 0) {
    throw std::invalid_argument("flash attention: packed sequences take no decode splits");
  }
  with_head_dim(head_dim, [&](auto config) {
    using Tile = typename decltype(config)::Fwd;
    if (p.num_splits == 0) {
      const dim3 grid(ceil_div(p.seqlen_q, Tile::BLOCK_M), p.heads_q, p.batch);
      with_varlen(p, [&](auto varlen) {
        launch("flash_fwd_kernel", flash_fwd_kernel<T, Tile, decltype(varlen)::value>, grid,
               dim3(Tile::THREADS), Tile::SMEM_BYTES, p);
      });
      return;
    }
    auto decode = [&](auto tile) {
      using Decode = decltype(tile);
      launch("flash_decode_kernel", flash_decode_kernel<T, Decode, false>,
             dim3(p.num_splits, p.heads_kv, p.batch), dim3(Decode::THREADS), Decode::SMEM_BYTES,
             p);
    };
    // The fewest m16 tiles that hold the packed rows (decode_splits admits at most 4).
    switch (decode_row_tiles(int64_t(p.heads_q / p.heads_kv) * p.seqlen_q)) {
      case 1: decode(DecodeTile<Tile::D, 1>{}); break;
      case 2: decode(DecodeTile<Tile::D, 2>{}); break;
      default: decode(DecodeTile<Tile::D, 4>{}); break;
    }
    if (p.num_splits > 1) {
      const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
      launch("flash_decode_combine_kernel", flash_decode_combine_kernel<T, Tile::D>,
             dim3(unsigned((rows + 7) / 8)), dim3(256), 0, p);
    }
  });
}

// Attention against a KV cache (the AttnParams fields of flash_attention_common.cuh): the append
// kernel when there are new keys or a rotation (it writes the caches and p.q_rot), then the
// decode kernel's KVCACHE specialization over each sequence's cache_seqlens[b] + seqlen_new keys,
// reading p.q_rot when rotating, and the combine kernel when p.num_splits > 1. p.num_splits from
// decode_splits with seqlen_k the capacity (at least 1: the callers return before any launch
// for an empty cache); the packed rows (Hq / Hkv) * Sq at most kDecodeMaxRows. Every grid comes
// from shapes, none from the lengths: nothing here reads device memory.
template <typename T, typename Launch>
void run_kvcache(const AttnParams& p, int head_dim, Launch&& launch) {
  if (p.num_splits < 1 || decode_row_tiles(int64_t(p.heads_q / p.heads_kv) * p.seqlen_q) == 0) {
    throw std::invalid_argument("flash attention with a KV cache: needs decode splits and at "
                                "most 64 packed query rows");
  }
  with_head_dim(head_dim, [&](auto config) {
    constexpr int D = decltype(config)::Fwd::D;
    const bool rotary = p.rotary_cos != nullptr;
    const int n_tokens = p.seqlen_new > p.seqlen_q || !rotary ? p.seqlen_new : p.seqlen_q;
    if (n_tokens > 0) {
      launch("kvcache_append_kernel", kvcache_append_kernel<T, D>,
             dim3(unsigned(int64_t(p.batch) * n_tokens)), dim3(kAppendThreads), 0, p);
    }
    if (p.seqlen_q == 0) return;
    AttnParams attend = p;
    if (rotary) attend.q = p.q_rot, attend.q_s = p.q_rot_s;
    auto decode = [&](auto tile) {
      using Decode = decltype(tile);
      launch("flash_decode_kernel", flash_decode_kernel<T, Decode, true>,
             dim3(p.num_splits, p.heads_kv, p.batch), dim3(Decode::THREADS), Decode::SMEM_BYTES,
             attend);
    };
    switch (decode_row_tiles(int64_t(p.heads_q / p.heads_kv) * p.seqlen_q)) {
      case 1: decode(DecodeTile<D, 1>{}); break;
      case 2: decode(DecodeTile<D, 2>{}); break;
      default: decode(DecodeTile<D, 4>{}); break;
    }
    if (p.num_splits > 1) {
      const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
      launch("flash_decode_combine_kernel", flash_decode_combine_kernel<T, D>,
             dim3(unsigned((rows + 7) / 8)), dim3(256), 0, attend);
    }
  });
}

template <typename T, typename Launch>
void run_backward(const AttnParams& p, int head_dim, Launch&& launch) {
  with_head_dim(head_dim, [&](auto config) {
    with_varlen(p, [&](auto varlen) {
      constexpr bool VARLEN = decltype(varlen)::value;
      using Dkdv = typename decltype(config)::Dkdv;
      using Dq = typename decltype(config)::Dq;
      // One warp per row of delta: (B, Hq, Sq), or (Hq, total_q) packed.
      const int64_t rows = VARLEN ? p.heads_q * p.total_q
                                  : int64_t(p.batch) * p.heads_q * p.seqlen_q;
      launch("flash_bwd_delta_kernel", flash_bwd_delta_kernel<T, Dq::D, VARLEN>,
             dim3(unsigned((rows + 7) / 8)), dim3(256), 0, p);
      launch("flash_bwd_dkdv_kernel", flash_bwd_dkdv_kernel<T, Dkdv, VARLEN>,
             dim3(ceil_div(p.seqlen_k, Dkdv::BLOCK_OWN), p.heads_kv, p.batch),
             dim3(Dkdv::THREADS), Dkdv::SMEM_BYTES, p);
      launch("flash_bwd_dq_kernel", flash_bwd_dq_kernel<T, Dq, VARLEN>,
             dim3(ceil_div(p.seqlen_q, Dq::BLOCK_OWN), p.heads_q, p.batch), dim3(Dq::THREADS),
             Dq::SMEM_BYTES, p);
    });
  });
}

// The first launch of `run` whose dynamic shared memory is over `limit` bytes per block, or
// {nullptr, 0} when every launch fits. `run` takes a launch callable and passes it to
// run_forward or run_backward: a dry run that launches nothing, so the check sees the very
// launches the real run makes.
struct SmemNeed {
  const char* kernel;
  size_t bytes;
};
template <typename Run>
SmemNeed first_over_smem_limit(size_t limit, Run&& run) {
  SmemNeed over{nullptr, 0};
  run([&](const char* name, auto, dim3, dim3, size_t smem, const AttnParams&) {
    if (over.kernel == nullptr && smem > limit) over = {name, smem};
  });
  return over;
}

}  // namespace attention
}  // namespace llama_kernels
