// The forward (prefill) kernel: O = softmax(scale * Q K^T + mask) V and, per query row,
// lse_i = log sum_j exp(scale * q_i . k_j) over the keys it sees (natural log), which the
// backward uses to recompute P without a second pass. Base-2 softmax and the conventions:
// flash_attention_common.cuh.
//
// One block per (query block of BLOCK_M rows, query head, batch); WARPS warps stacked along the
// queries, MT m16 tiles each. The block walks its key blocks last to first (the masked ones
// first) with one K and one V buffer, in FlashAttention-2's order of cp.async: V[n] is fetched
// while Q K[n]^T runs, K[n-1] while the softmax and P V[n] run. The online softmax keeps a
// running max and sum per row in fp32 registers (base 2: scores are scaled by scale * log2 e
// first, so any sign of scale works, then masked to -inf). P is rounded to T in registers and
// used directly as the A operand of P V. At the end O is divided by the row sum and staged
// through the Q tile for 16-byte stores.
//
// VARLEN (packed sequences, AttnParams::cu_seqlens_q): the same program over sequence b's rows,
// its bounds read from cu_seqlens; the grid is sized by the longest sequence and a block past
// its own sequence's end exits at once. A sequence may have more queries than keys, or none:
// under a causal mask its first rows then see no key.
//
// Preconditions: dense causal needs seqlen_q <= seqlen_k; a sequence without keys is handled
// (O = 0, lse = -inf); grid (ceil(Sq / BLOCK_M), Hq, B), Tile::THREADS threads,
// Tile::SMEM_BYTES of dynamic shared memory (run_forward in flash_attention_kernels.cuh).
#pragma once

#include "flash_attention_common.cuh"

namespace llama_kernels {
namespace attention {

// The forward's tile: BLOCK_M queries x BLOCK_N keys per step, WARPS warps; shared memory holds
// the Q tile and one K and one V tile.
template <int D_, int BLOCK_M_, int BLOCK_N_, int WARPS_>
struct FwdTile {
  static constexpr int D = D_, BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_, WARPS = WARPS_;
  static constexpr int THREADS = WARPS * kWarpSize;
  static constexpr int MT = BLOCK_M / (16 * WARPS);  // m16 tiles per warp
  static constexpr int SMEM_BYTES = (BLOCK_M + 2 * BLOCK_N) * D * 2;
  static_assert(BLOCK_M % (16 * WARPS) == 0 && BLOCK_N % 16 == 0 && D % 16 == 0, "tile shape");
};

template <typename T, typename Tile, bool VARLEN = false>
__global__ void __launch_bounds__(Tile::THREADS)
    flash_fwd_kernel(const AttnParams p) {
  constexpr int D = Tile::D, BLOCK_M = Tile::BLOCK_M, BLOCK_N = Tile::BLOCK_N;
  constexpr int THREADS = Tile::THREADS, MT = Tile::MT, NT = BLOCK_N / 8, DT = D / 8;
  const auto [m_block, h, b, h_kv] = query_block(p);  // the longest rows start first
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const SwizzledLanes<D> lanes(lane);
  const Sequence seq = sequence<VARLEN>(p, b);
  const int sq = seq.sq, sk = seq.sk;
  if (VARLEN && m_block * BLOCK_M >= sq) return;  // past this sequence's end (block-uniform)
  const int row0 = warp * MT * 16;  // this warp's first row in the block

  const T* q = static_cast<const T*>(p.q) + batch_offset<VARLEN>(p.q_s, b, seq.q0) +
               h * p.q_s.head + int64_t(m_block) * BLOCK_M * p.q_s.row;
  const T* k = static_cast<const T*>(p.k) + batch_offset<VARLEN>(p.k_s, b, seq.k0) +
               h_kv * p.k_s.head;
  const T* v = static_cast<const T*>(p.v) + batch_offset<VARLEN>(p.v_s, b, seq.k0) +
               h_kv * p.v_s.head;
  T* s_q = reinterpret_cast<T*>(tc::dynamic_smem());
  T* s_k = s_q + BLOCK_M * D;
  T* s_v = s_k + BLOCK_N * D;
  const uint32_t sh_q = tc::smem_addr(s_q), sh_k = tc::smem_addr(s_k), sh_v = tc::smem_addr(s_v);

  const int n_end = key_block_end(m_block, BLOCK_M, BLOCK_N, sq, sk, p.causal);
  load_tile<T, D, BLOCK_M, THREADS>(sh_q, q, p.q_s.row, sq - m_block * BLOCK_M);
  if (n_end > 0) {
    load_tile<T, D, BLOCK_N, THREADS>(sh_k, k + int64_t(n_end - 1) * BLOCK_N * p.k_s.row,
                                      p.k_s.row, sk - (n_end - 1) * BLOCK_N);
  }
  tc::cp_async_commit();

  float o[MT][DT][4];
  float row_max[MT][2], row_sum[MT][2];  // row_max in scaled base-2 units; row_sum per lane
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  for (int n = n_end - 1; n >= 0; --n) {
    tc::cp_async_wait<0>();
    tc::block_sync();  // K[n] has landed; every warp is done with V[n+1]
    load_tile<T, D, BLOCK_N, THREADS>(sh_v, v + int64_t(n) * BLOCK_N * p.v_s.row, p.v_s.row,
                                      sk - n * BLOCK_N);
    tc::cp_async_commit();

    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
      }
    }
#pragma unroll
    for (int kt = 0; kt < D / 16; ++kt) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) load_a<D>(a[mt], sh_q, row0 + mt * 16, kt * 16, lanes);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b0[2], b1[2];
        load_b_nk<D>(b0, b1, sh_k, np * 16, kt * 16, lanes);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          tc::mma_16816<T>(s[mt][2 * np], a[mt], b0);
          tc::mma_16816<T>(s[mt][2 * np + 1], a[mt], b1);
        }
      }
    }

    // Scale to base 2, then mask (after scaling, so a negative or zero scale cannot turn the
    // mask's -inf into +inf or NaN).
    const bool masked = tile_needs_mask(m_block, n, BLOCK_M, BLOCK_N, sq, sk, p.causal);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][nt][e] *= p.softmax_scale_log2;
          if (masked) {
            const int i = m_block * BLOCK_M + row0 + mt * 16 + g + (e / 2) * 8;
            const int j = n * BLOCK_N + nt * 8 + 2 * c + e % 2;
            if (!visible(i, j, sq, sk, p.causal)) s[mt][nt][e] = -INFINITY;
          }
        }
      }
    }

    tc::cp_async_wait<0>();
    tc::block_sync();  // V[n] has landed; every warp is done with K[n]
    if (n > 0) {
      load_tile<T, D, BLOCK_N, THREADS>(sh_k, k + int64_t(n - 1) * BLOCK_N * p.k_s.row, p.k_s.row,
                                        sk - (n - 1) * BLOCK_N);
      tc::cp_async_commit();
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) online_softmax_step(s[mt], o[mt], row_max[mt], row_sum[mt]);

    // O += P V[n]
#pragma unroll
    for (int pk = 0; pk < BLOCK_N / 16; ++pk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) accumulators_as_a<T>(a[mt], s[mt][2 * pk], s[mt][2 * pk + 1]);
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        uint32_t b0[2], b1[2];
        load_b_kn<D>(b0, b1, sh_v, pk * 16, dp * 16, lanes);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          tc::mma_16816<T>(o[mt][2 * dp], a[mt], b0);
          tc::mma_16816<T>(o[mt][2 * dp + 1], a[mt], b1);
        }
      }
    }
  }

  // O /= rowsum; lse = ln 2 * (max + log2 rowsum). A row that saw no key gets O = 0, lse = -inf.
  float* lse = p.lse + lse_offset<VARLEN>(p, b, h, seq.q0, sq);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[mt][r];
      sum += tc::shfl_xor(sum, 1);
      sum += tc::shfl_xor(sum, 2);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[mt][dt][2 * r] *= inv;
        o[mt][dt][2 * r + 1] *= inv;
      }
      const int i = m_block * BLOCK_M + row0 + mt * 16 + g + r * 8;
      if (c == 0 && i < sq) lse[i] = sum > 0.f ? (row_max[mt][r] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
  // Stage O through the Q tile (each warp only ever read its own Q rows) for 16-byte stores.
  // With no key block (Sk == 0) the Q copies were never waited for: every thread waits for its
  // own, and the barrier makes sure none lands after the staging stores (block-uniform branch).
  if (n_end == 0) {
    tc::cp_async_wait<0>();
    tc::block_sync();
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) accumulators_to_smem<T, D>(s_q, o[mt], row0 + mt * 16, lane);
  tc::block_sync();
  T* out = static_cast<T*>(p.o) + batch_offset<VARLEN>(p.o_s, b, seq.q0) + h * p.o_s.head +
           int64_t(m_block) * BLOCK_M * p.o_s.row;
  store_tile<T, D, BLOCK_M, THREADS>(out, s_q, p.o_s.row, sq - m_block * BLOCK_M);
}

}  // namespace attention
}  // namespace llama_kernels
