// The backward kernels: dQ, dK, dV of O = softmax(scale * Q K^T + mask) V given dO, from the
// forward's O and lse. The math, per (batch, query head), with o the elementwise product:
//   P_ij  = exp(scale q_i . k_j - lse_i), 0 where masked (recomputed from the saved lse; in
//           base 2, exp2(softmax_scale_log2 q_i . k_j - lse_i log2 e))
//   dV    = P^T dO                      dP = dO V^T
//   delta = rowsum(dO o O)              (= rowsum(P o dP), since O = P V)
//   dS    = P o (dP - delta)            (the softmax's gradient, per row)
//   dQ    = scale dS K                  dK = scale dS^T Q
// and a kv head's dK and dV sum those of the query heads of its group. The scale goes into dS
// before dS is rounded to T for the dQ and dK products, as eager PyTorch rounds the gradient
// of the scaled scores: unscaled, dS is 1 / scale times larger and overflows fp16 sooner.
//
// Deterministic, without atomics: flash_bwd_delta_kernel computes delta; flash_bwd_dkdv_kernel
// owns a key block (dK, dV in registers, summed over the query heads of its kv group and over
// its query blocks in a fixed order) and flash_bwd_dq_kernel a query block (dQ in registers),
// each recomputing P, so S and dP are computed in both.
//
// VARLEN (packed sequences, AttnParams::cu_seqlens_q): the dK/dV and dQ kernels run over
// sequence b's rows with its bounds from cu_seqlens, grids sized by the longest sequence, and a
// block past its own sequence's end exits at once; delta walks the (Hq, total_q) rows, which
// need no sequence bounds. Every key row of a sequence gets its dK, dV written (zero where no
// query sees it), every query row its dQ.
//
// Preconditions: lse from the forward of the same q, k, v, causal and scale; delta (B, Hq, Sq),
// or (Hq, total_q) packed, fp32 scratch; dense causal needs seqlen_q <= seqlen_k; the three
// kernels run in order on one stream (run_backward in flash_attention_kernels.cuh): delta, then
// dK/dV and dQ, which read it.
#pragma once

#include "flash_attention_common.cuh"

namespace llama_kernels {
namespace attention {

// delta = rowsum(dout * out) in fp32, one warp per (batch, head, query) row; (B, Hq, Sq), or
// one per (head, packed query) row when VARLEN, (Hq, total_q).
template <typename T, int D, bool VARLEN = false>
__global__ void __launch_bounds__(256) flash_bwd_delta_kernel(const AttnParams p) {
  const int64_t rows = VARLEN ? p.heads_q * p.total_q
                              : int64_t(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t row = warp_row();
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // whole warps leave together
  const T* dout;
  const T* out;
  if constexpr (VARLEN) {
    const int64_t i = row % p.total_q;
    const int h = row / p.total_q;
    dout = static_cast<const T*>(p.dout) + h * p.dout_s.head + i * p.dout_s.row;
    out = static_cast<const T*>(p.out) + h * p.out_s.head + i * p.out_s.row;
  } else {
    const int i = row % p.seqlen_q;
    const int h = row / p.seqlen_q % p.heads_q;
    const int b = row / (int64_t(p.seqlen_q) * p.heads_q);
    dout = static_cast<const T*>(p.dout) + b * p.dout_s.batch + h * p.dout_s.head +
           i * p.dout_s.row;
    out = static_cast<const T*>(p.out) + b * p.out_s.batch + h * p.out_s.head +
          i * p.out_s.row;
  }
  float acc = 0.f;
#pragma unroll
  for (int d = 2 * lane; d < D; d += 2 * kWarpSize) {
    const float2 x = tc::unpack2<T>(*reinterpret_cast<const uint32_t*>(dout + d));
    const float2 y = tc::unpack2<T>(*reinterpret_cast<const uint32_t*>(out + d));
    acc += x.x * y.x + x.y * y.y;
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) acc += tc::shfl_xor(acc, offset);
  if (lane == 0) p.delta[row] = acc;
}

// Tiles of both backward kernels: WARPS warps of 16 rows own the block's BLOCK_OWN rows (keys
// for dK/dV, queries for dQ); the loop walks the other side BLOCK_STEP rows at a time, double
// buffered so the next step's tiles load during this step's products (four in dK/dV: S^T, dP^T,
// dV, dK; three in dQ: S, dP, dQ).
template <int D_, int BLOCK_STEP_, int WARPS_>
struct BwdTile {
  static constexpr int D = D_, BLOCK_STEP = BLOCK_STEP_, WARPS = WARPS_;
  static constexpr int THREADS = WARPS * kWarpSize;
  static constexpr int BLOCK_OWN = 16 * WARPS;
  // Two resident tiles, two double-buffered ones, and two fp32 vectors per step buffer.
  static constexpr int SMEM_BYTES = (2 * BLOCK_OWN + 4 * BLOCK_STEP) * D * 2 + 4 * BLOCK_STEP * 4;
  static_assert(BLOCK_STEP % 16 == 0 && D % 16 == 0, "tile shape");
};

// The backward's paired products of one warp's 16 rows (from row0 of the [rows][k] tiles a1
// and a2) with all NT n8 column tiles of two [n][k] tiles n1 and n2, sharing the k loop:
// acc1 = A1 N1^T, acc2 = A2 N2^T (dK/dV: K Q^T and V dO^T; dQ: Q K^T and dO V^T).
template <typename T, int D, int NT>
__device__ __forceinline__ void paired_products(float (&acc1)[NT][4], float (&acc2)[NT][4],
                                                uint32_t a1, uint32_t a2, int row0, uint32_t n1,
                                                uint32_t n2, const SwizzledLanes<D>& lanes) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc1[nt][e] = acc2[nt][e] = 0.f;
  }
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) {
    uint32_t frag1[4], frag2[4];
    load_a<D>(frag1, a1, row0, kt * 16, lanes);
    load_a<D>(frag2, a2, row0, kt * 16, lanes);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b0[2], b1[2];
      load_b_nk<D>(b0, b1, n1, np * 16, kt * 16, lanes);
      tc::mma_16816<T>(acc1[2 * np], frag1, b0);
      tc::mma_16816<T>(acc1[2 * np + 1], frag1, b1);
      load_b_nk<D>(b0, b1, n2, np * 16, kt * 16, lanes);
      tc::mma_16816<T>(acc2[2 * np], frag2, b0);
      tc::mma_16816<T>(acc2[2 * np + 1], frag2, b1);
    }
  }
}

// dK and dV of one block of BLOCK_OWN keys of kv head h_kv, grid (ceil(Sk / BLOCK_OWN), Hkv, B):
// the steps walk every query block that sees the key block, for each query head of the group.
template <typename T, typename Tile, bool VARLEN = false>
__global__ void __launch_bounds__(Tile::THREADS)
    flash_bwd_dkdv_kernel(const AttnParams p) {
  constexpr int D = Tile::D, BLOCK_N = Tile::BLOCK_OWN, BLOCK_M = Tile::BLOCK_STEP;
  constexpr int THREADS = Tile::THREADS, QT = BLOCK_M / 8, DT = D / 8;
  const int n_block = blockIdx.x, h_kv = blockIdx.y, b = blockIdx.z;
  const int group = p.heads_q / p.heads_kv;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const SwizzledLanes<D> lanes(lane);
  const Sequence seq = sequence<VARLEN>(p, b);
  const int sq = seq.sq, sk = seq.sk;
  if (VARLEN && n_block * BLOCK_N >= sk) return;  // past this sequence's keys (block-uniform)
  const int key0 = warp * 16;  // this warp's first key row in the block

  T* s_k = reinterpret_cast<T*>(tc::dynamic_smem());
  T* s_v = s_k + BLOCK_N * D;
  T* s_q = s_v + BLOCK_N * D;        // [2][BLOCK_M][D]
  T* s_do = s_q + 2 * BLOCK_M * D;   // [2][BLOCK_M][D]
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * BLOCK_M * D);  // [2][BLOCK_M], log2 units
  float* s_delta = s_lse + 2 * BLOCK_M;                               // [2][BLOCK_M]
  const uint32_t sh_k = tc::smem_addr(s_k), sh_v = tc::smem_addr(s_v);
  const uint32_t sh_q = tc::smem_addr(s_q), sh_do = tc::smem_addr(s_do);

  const int64_t key_offset = int64_t(n_block) * BLOCK_N;
  const T* k = static_cast<const T*>(p.k) + batch_offset<VARLEN>(p.k_s, b, seq.k0) +
               h_kv * p.k_s.head;
  const T* v = static_cast<const T*>(p.v) + batch_offset<VARLEN>(p.v_s, b, seq.k0) +
               h_kv * p.v_s.head;
  load_tile<T, D, BLOCK_N, THREADS>(sh_k, k + key_offset * p.k_s.row, p.k_s.row, sk - key_offset);
  load_tile<T, D, BLOCK_N, THREADS>(sh_v, v + key_offset * p.v_s.row, p.v_s.row, sk - key_offset);

  // Steps: every query block from the first that sees this key block, for each query head of
  // the group.
  const int m_begin = query_block_begin(n_block, BLOCK_M, BLOCK_N, sq, sk, p.causal);
  const int m_count = ceil_div(sq, BLOCK_M) - m_begin;
  const int steps = group * m_count;
  // A step's Q and dO tiles go by cp.async; its lse and delta (thread r < BLOCK_M holds row r)
  // are loaded into registers when the step is issued and stored to shared memory only at the
  // end of the step before it, so their global latency hides behind that step's products.
  static_assert(BLOCK_M <= THREADS, "one thread per query row of a step");
  float next_lse = INFINITY, next_delta = 0.f;
  auto load_step = [&](int step, int buf) {
    const int h = h_kv * group + step / m_count;
    const int m = m_begin + step % m_count;
    const int64_t row0 = int64_t(m) * BLOCK_M;
    const T* q = static_cast<const T*>(p.q) + batch_offset<VARLEN>(p.q_s, b, seq.q0) +
                 h * p.q_s.head;
    const T* dout = static_cast<const T*>(p.dout) + batch_offset<VARLEN>(p.dout_s, b, seq.q0) +
                    h * p.dout_s.head;
    load_tile<T, D, BLOCK_M, THREADS>(sh_q + 2 * buf * BLOCK_M * D, q + row0 * p.q_s.row,
                                      p.q_s.row, sq - row0);
    load_tile<T, D, BLOCK_M, THREADS>(sh_do + 2 * buf * BLOCK_M * D, dout + row0 * p.dout_s.row,
                                      p.dout_s.row, sq - row0);
    const int64_t row = row0 + threadIdx.x;
    const bool ok = threadIdx.x < BLOCK_M && row < sq;  // past the end: P = 0, delta = 0
    const int64_t at = lse_offset<VARLEN>(p, b, h, seq.q0, sq) + row;
    next_lse = ok ? p.lse[at] * kLog2e : INFINITY;
    next_delta = ok ? p.delta[at] : 0.f;
  };
  auto store_row_stats = [&](int buf) {
    if (threadIdx.x < BLOCK_M) {
      s_lse[buf * BLOCK_M + threadIdx.x] = next_lse;
      s_delta[buf * BLOCK_M + threadIdx.x] = next_delta;
    }
  };
  if (steps > 0) {
    load_step(0, 0);
    store_row_stats(0);
  }
  tc::cp_async_commit();

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
  }

  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    const int m = m_begin + step % m_count;
    tc::cp_async_wait<0>();
    tc::block_sync();  // this step's tiles have landed; every warp is done with the last step
    if (step + 1 < steps) load_step(step + 1, buf ^ 1);
    tc::cp_async_commit();
    const uint32_t sq_tile = sh_q + 2 * buf * BLOCK_M * D;
    const uint32_t sdo_tile = sh_do + 2 * buf * BLOCK_M * D;
    const float* lse = s_lse + buf * BLOCK_M;
    const float* delta = s_delta + buf * BLOCK_M;

    // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x BLOCK_M queries.
    float pt[QT][4], dpt[QT][4];
    paired_products<T, D, QT>(pt, dpt, sh_k, sh_v, key0, sq_tile, sdo_tile, lanes);

    // P^T from the saved lse, then scale dS^T = scale P^T o (dP^T - delta), both indexed by
    // query column. The scale goes in before dS is rounded to T, as in eager (its rounded dS
    // is the gradient of the scaled scores): fp16's overflow of dS moves 1 / scale out.
    const bool masked = tile_needs_mask(m, n_block, BLOCK_M, BLOCK_N, sq, sk, p.causal);
#pragma unroll
    for (int qt = 0; qt < QT; ++qt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = qt * 8 + 2 * c + e % 2;
        const int j = n_block * BLOCK_N + key0 + g + (e / 2) * 8;
        const int i = m * BLOCK_M + col;
        float prob = exp2f(pt[qt][e] * p.softmax_scale_log2 - lse[col]);
        if (masked && !visible(i, j, sq, sk, p.causal)) prob = 0.f;
        pt[qt][e] = prob;
        dpt[qt][e] = prob * (dpt[qt][e] - delta[col]) * p.softmax_scale;
      }
    }

    // dV += P^T dO and dK += dS^T Q: k runs over the step's queries.
#pragma unroll
    for (int qk = 0; qk < QT / 2; ++qk) {
      uint32_t ap[4], ads[4];
      accumulators_as_a<T>(ap, pt[2 * qk], pt[2 * qk + 1]);
      accumulators_as_a<T>(ads, dpt[2 * qk], dpt[2 * qk + 1]);
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        uint32_t b0[2], b1[2];
        load_b_kn<D>(b0, b1, sdo_tile, qk * 16, dp * 16, lanes);
        tc::mma_16816<T>(dv[2 * dp], ap, b0);
        tc::mma_16816<T>(dv[2 * dp + 1], ap, b1);
        load_b_kn<D>(b0, b1, sq_tile, qk * 16, dp * 16, lanes);
        tc::mma_16816<T>(dk[2 * dp], ads, b0);
        tc::mma_16816<T>(dk[2 * dp + 1], ads, b1);
      }
    }
    if (step + 1 < steps) store_row_stats(buf ^ 1);  // nobody reads buf ^ 1 until the barrier
  }

  // Stage through the K and V tiles (each warp only ever read its own rows of them). With no
  // step (no query sees the block: a packed sequence without queries, or dense seqlen_q == 0,
  // which flash_attention.cu never launches) the K and V copies were never waited for: every
  // thread waits for its own, and the barrier makes sure none lands after the staging stores
  // (block-uniform branch), as in the forward's and the dQ kernel's epilogues.
  if (steps == 0) {
    tc::cp_async_wait<0>();
    tc::block_sync();
  }
  accumulators_to_smem<T, D>(s_k, dk, key0, lane);
  accumulators_to_smem<T, D>(s_v, dv, key0, lane);
  tc::block_sync();
  T* dk_out = static_cast<T*>(p.dk) + batch_offset<VARLEN>(p.dk_s, b, seq.k0) +
              h_kv * p.dk_s.head + key_offset * p.dk_s.row;
  T* dv_out = static_cast<T*>(p.dv) + batch_offset<VARLEN>(p.dv_s, b, seq.k0) +
              h_kv * p.dv_s.head + key_offset * p.dv_s.row;
  store_tile<T, D, BLOCK_N, THREADS>(dk_out, s_k, p.dk_s.row, sk - key_offset);
  store_tile<T, D, BLOCK_N, THREADS>(dv_out, s_v, p.dv_s.row, sk - key_offset);
}

// dQ of one block of BLOCK_OWN queries of query head h, grid (ceil(Sq / BLOCK_OWN), Hq, B): the
// steps walk the key blocks the query block sees.
template <typename T, typename Tile, bool VARLEN = false>
__global__ void __launch_bounds__(Tile::THREADS)
    flash_bwd_dq_kernel(const AttnParams p) {
  constexpr int D = Tile::D, BLOCK_M = Tile::BLOCK_OWN, BLOCK_N = Tile::BLOCK_STEP;
  constexpr int THREADS = Tile::THREADS, NT = BLOCK_N / 8, DT = D / 8;
  const auto [m_block, h, b, h_kv] = query_block(p);  // the longest rows start first
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const SwizzledLanes<D> lanes(lane);
  const Sequence seq = sequence<VARLEN>(p, b);
  const int sq = seq.sq, sk = seq.sk;
  if (VARLEN && m_block * BLOCK_M >= sq) return;  // past this sequence's end (block-uniform)
  const int row0 = warp * 16;

  T* s_q = reinterpret_cast<T*>(tc::dynamic_smem());
  T* s_do = s_q + BLOCK_M * D;
  T* s_k = s_do + BLOCK_M * D;       // [2][BLOCK_N][D]
  T* s_v = s_k + 2 * BLOCK_N * D;    // [2][BLOCK_N][D]
  const uint32_t sh_q = tc::smem_addr(s_q), sh_do = tc::smem_addr(s_do);
  const uint32_t sh_k = tc::smem_addr(s_k), sh_v = tc::smem_addr(s_v);

  const int64_t q_offset = int64_t(m_block) * BLOCK_M;
  const T* q = static_cast<const T*>(p.q) + batch_offset<VARLEN>(p.q_s, b, seq.q0) +
               h * p.q_s.head;
  const T* dout = static_cast<const T*>(p.dout) + batch_offset<VARLEN>(p.dout_s, b, seq.q0) +
                  h * p.dout_s.head;
  const T* k = static_cast<const T*>(p.k) + batch_offset<VARLEN>(p.k_s, b, seq.k0) +
               h_kv * p.k_s.head;
  const T* v = static_cast<const T*>(p.v) + batch_offset<VARLEN>(p.v_s, b, seq.k0) +
               h_kv * p.v_s.head;
  load_tile<T, D, BLOCK_M, THREADS>(sh_q, q + q_offset * p.q_s.row, p.q_s.row, sq - q_offset);
  load_tile<T, D, BLOCK_M, THREADS>(sh_do, dout + q_offset * p.dout_s.row, p.dout_s.row,
                                    sq - q_offset);
  auto load_step = [&](int n, int buf) {
    load_kv_stage<T, D, BLOCK_N, THREADS>(sh_k, sh_v, buf, k, v, p, sk, int64_t(n) * BLOCK_N);
  };
  const int n_end = key_block_end(m_block, BLOCK_M, BLOCK_N, sq, sk, p.causal);
  if (n_end > 0) load_step(0, 0);
  tc::cp_async_commit();

  // This lane's rows g and g + 8: lse in log2 units (+inf past the end: P = 0), delta.
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = int(q_offset) + row0 + g + 8 * r;
    const int64_t at = lse_offset<VARLEN>(p, b, h, seq.q0, sq) + i;
    lse[r] = i < sq ? p.lse[at] * kLog2e : INFINITY;
    delta[r] = i < sq ? p.delta[at] : 0.f;
  }

  float dq[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

  for (int n = 0; n < n_end; ++n) {
    const int buf = n & 1;
    tc::cp_async_wait<0>();
    tc::block_sync();  // K[n], V[n] (and Q, dO) have landed; every warp is done with step n-1
    if (n + 1 < n_end) load_step(n + 1, buf ^ 1);
    tc::cp_async_commit();
    const uint32_t sk_tile = sh_k + 2 * buf * BLOCK_N * D;
    const uint32_t sv_tile = sh_v + 2 * buf * BLOCK_N * D;

    // S = Q K^T and dP = dO V^T: this warp's 16 queries x BLOCK_N keys.
    float s[NT][4], dp[NT][4];
    paired_products<T, D, NT>(s, dp, sh_q, sh_do, row0, sk_tile, sv_tile, lanes);

    // scale dS = scale P o (dP - delta) (scaled before rounding, as in the dK/dV kernel), P
    // recomputed from lse.
    const bool masked = tile_needs_mask(m_block, n, BLOCK_M, BLOCK_N, sq, sk, p.causal);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = int(q_offset) + row0 + g + (e / 2) * 8;
        const int j = n * BLOCK_N + nt * 8 + 2 * c + e % 2;
        float prob = exp2f(s[nt][e] * p.softmax_scale_log2 - lse[e / 2]);
        if (masked && !visible(i, j, sq, sk, p.causal)) prob = 0.f;
        s[nt][e] = prob * (dp[nt][e] - delta[e / 2]) * p.softmax_scale;
      }
    }

    // dQ += dS K: k runs over the step's keys.
#pragma unroll
    for (int nk = 0; nk < NT / 2; ++nk) {
      uint32_t ads[4];
      accumulators_as_a<T>(ads, s[2 * nk], s[2 * nk + 1]);
#pragma unroll
      for (int dp2 = 0; dp2 < DT / 2; ++dp2) {
        uint32_t b0[2], b1[2];
        load_b_kn<D>(b0, b1, sk_tile, nk * 16, dp2 * 16, lanes);
        tc::mma_16816<T>(dq[2 * dp2], ads, b0);
        tc::mma_16816<T>(dq[2 * dp2 + 1], ads, b1);
      }
    }
  }

  if (n_end == 0) {  // Q / dO copies never waited for (as in the forward's epilogue)
    tc::cp_async_wait<0>();
    tc::block_sync();
  }
  accumulators_to_smem<T, D>(s_q, dq, row0, lane);
  tc::block_sync();
  T* dq_out = static_cast<T*>(p.dq) + batch_offset<VARLEN>(p.dq_s, b, seq.q0) + h * p.dq_s.head +
              q_offset * p.dq_s.row;
  store_tile<T, D, BLOCK_M, THREADS>(dq_out, s_q, p.dq_s.row, sq - q_offset);
}

}  // namespace attention
}  // namespace llama_kernels
