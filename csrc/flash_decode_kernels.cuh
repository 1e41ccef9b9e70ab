// The decode kernels: the forward for a few queries against a long KV cache (decoding,
// speculative steps), split over the keys ("flash-decoding"), and the merge of the splits.
//
// The math. Split s covers keys K_s and gives, per query row, the softmax over its own keys:
//   lse_s = log sum_{j in K_s} exp(s_ij),  o_s = sum_{j in K_s} exp(s_ij - lse_s) v_j.
// The splits partition the keys, so with lse = log sum_s exp(lse_s) (taken as
// M + log sum_s exp(lse_s - M), M = max_s lse_s, so nothing overflows):
//   o = sum_s exp(lse_s - lse) o_s,
// the full softmax-weighted sum. The 4 warps of a block merge the same way, in base 2 from their
// unnormalized accumulators: m = max_w m_w, l = sum_w l_w exp2(m_w - m),
// o = sum_w o_w exp2(m_w - m) / l. A split (or warp) that sees no key has lse -inf (max -inf)
// and weight 0; a row no split sees gets o = 0, lse = -inf.
//
// Why a separate kernel: the prefill tiling would leave 127 of 128 rows of a block idle and read
// each kv head once per query head. Here the query heads of one kv group and their queries are
// packed into the rows of 1, 2 or 4 m16 tiles (row r = g * Sq + i: head h_kv * group + g,
// query i; DecodeTile::ROWS = 16, 32 or 64 rows), so K and V are read once per group, and the
// keys are split over blocks and, inside a block, over the warps that share an m16 tile: with
// 1 / 2 / 4 tiles, 4 / 2 / 1 warps take 16 / 32 / 64 keys each of every 64-key stage. Each warp
// keeps its own running max, sum and accumulators, merged through shared memory at the end.
// With one split the block writes o and lse itself; with several, each block writes its
// normalized partial output and lse in fp32 to o_partial / lse_partial and
// flash_decode_combine_kernel merges them.
//
// Against a KV cache (KVCACHE): sequence b has its own key count sk = cache_seqlens[b] +
// seqlen_new, read on the device, so the grid comes from static shapes only (a CUDA graph can
// capture the launch): the split count is planned for the capacity (p.seqlen_k) and each
// sequence cuts its own stages into the splits, so a short sequence leaves some splits empty;
// an empty split writes lse -inf and weight 0, and a sequence with no key gets o = 0. With a
// block table (paged caches), each K and V row of a 64-key stage is found through the table:
// pages are powers of two from 16 rows, so a stage may span several pages or a page several
// stages, and each row's 16-byte chunks still go by cp.async.
//
// Preconditions: (Hq / Hkv) * Sq <= Tile::ROWS; seqlen_k > 0; p.num_splits from decode_splits
// (flash_attention_kernels.cuh: no split empty when dense), with o_partial, lse_partial
// allocated when it is above 1; grid (num_splits, Hkv, B) of DecodeTile::THREADS threads,
// DecodeTile::SMEM_BYTES of dynamic shared memory; the combine kernel one warp per (batch, head,
// query) row. KVCACHE: every sequence's sk within the capacity, and its table entries naming
// blocks of the pool (the callers' Python op checks both on eager calls).
#pragma once

#include "flash_attention_common.cuh"

namespace llama_kernels {
namespace attention {

constexpr int kDecodeMaxRows = 64;  // packed query rows: at most 4 m16 tiles

// The m16 tiles a decode block takes for `rows` packed query rows: 1, 2 or 4, 0 above
// kDecodeMaxRows (the prefill kernel's case).
__host__ __device__ constexpr int decode_row_tiles(int64_t rows) {
  return rows <= 16 ? 1 : rows <= 32 ? 2 : rows <= kDecodeMaxRows ? 4 : 0;
}

// ROW_TILES m16 tiles of packed rows on 4 warps; keys go in 64-key stages, double buffered,
// each split over the KEY_WARPS warps of a tile.
template <int D_, int ROW_TILES_>
struct DecodeTile {
  static constexpr int D = D_, WARPS = 4, THREADS = WARPS * kWarpSize;
  static constexpr int ROW_TILES = ROW_TILES_, ROWS = 16 * ROW_TILES;
  static constexpr int KEY_WARPS = WARPS / ROW_TILES;  // warps sharing one m16 tile
  static constexpr int BLOCK_N = 64;                     // keys per stage
  static constexpr int WARP_KEYS = BLOCK_N / KEY_WARPS;  // a warp's keys of each stage
  static constexpr int STAGE_BYTES = 2 * BLOCK_N * D * 2;  // K and V
  // Q rows, two K/V stages; the warps' fp32 accumulators reuse the stages at the end.
  static constexpr int SMEM_BYTES = ROWS * D * 2 + 2 * STAGE_BYTES;
  static constexpr int O_STRIDE = D + 8;  // floats between merge-scratch rows (bank spread)
  static_assert(ROW_TILES == 1 || ROW_TILES == 2 || ROW_TILES == 4, "1, 2 or 4 m16 tiles");
  static_assert(WARPS * 16 * O_STRIDE * 4 + 2 * WARPS * 16 * 4 <= 2 * STAGE_BYTES,
                "the merge scratch fits in the K/V stages");
};

// The K and V rows [key0, key0 + ROWS) of one kv head of sequence b from paged caches (k, v at
// the head's row 0 of block 0) into buffer buf of the [2][ROWS][D] stage tiles; rows at or past
// sk are zero-filled. As load_tile, thread t copies chunk t % (D / 8) of rows t / (D / 8) + it *
// THREADS / (D / 8); each of its rows looks up its own block (one table read serves K and V).
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_paged_kv_stage(uint32_t k_tiles, uint32_t v_tiles, int buf,
                                                    const T* k, const T* v, const AttnParams& p,
                                                    const int* table, int sk, int key0) {
  constexpr int kChunks = D / 8, kRowsPerPass = THREADS / kChunks;
  static_assert(THREADS % kChunks == 0 && kRowsPerPass % 8 == 0 && ROWS % kRowsPerPass == 0,
                "whole rows per pass, a multiple of 8 (the swizzle repeats every 8 rows)");
  const int r0 = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
  const uint32_t dst = 2 * buf * ROWS * D + 2 * swizzle<D>(r0, c * 8);
  const int row_mask = (1 << p.page_shift) - 1;
#pragma unroll
  for (int it = 0; it < ROWS / kRowsPerPass; ++it) {
    const int t = key0 + r0 + it * kRowsPerPass;
    const bool ok = t < sk;
    int64_t k_at = c * 8, v_at = c * 8;
    if (ok) {
      const int64_t block = table[t >> p.page_shift], row = t & row_mask;
      k_at += block * p.k_s.batch + row * p.k_s.row;
      v_at += block * p.v_s.batch + row * p.v_s.row;
    }
    tc::cp_async_16(k_tiles + dst + it * kRowsPerPass * 2 * D, k + k_at, ok);
    tc::cp_async_16(v_tiles + dst + it * kRowsPerPass * 2 * D, v + v_at, ok);
  }
}

// __launch_bounds__(128, 2) asks for two resident blocks per SM, the occupancy decode_splits
// plans for (at d128 a block's 68 to 80 KiB of shared memory allows no more than 2 on sm_80).
// It caps no registers: 2 blocks x 128 threads leave 256 registers a thread, above the 255
// maximum. It only steers ptxas. Registers (nvcc 13.0, no spills) for 1 / 2 / 4 row tiles:
// d64 96 / 139 / 140 and d128 153 / 181 / 198 on sm_80; d64 97 / 145 / 146 and
// d128 153 / 182 / 206 on sm_90.
template <typename T, typename Tile, bool KVCACHE>
__global__ void __launch_bounds__(Tile::THREADS, 2) flash_decode_kernel(const AttnParams p) {
  constexpr int D = Tile::D, BLOCK_N = Tile::BLOCK_N, THREADS = Tile::THREADS;
  constexpr int WARPS = Tile::WARPS, DT = D / 8, CHUNKS = D / 8, ROWS = Tile::ROWS;
  constexpr int KEY_WARPS = Tile::KEY_WARPS, WARP_KEYS = Tile::WARP_KEYS, NT = WARP_KEYS / 8;
  const int split = blockIdx.x, h_kv = blockIdx.y, b = blockIdx.z;
  const int group = p.heads_q / p.heads_kv;
  const int sq = p.seqlen_q;
  const int sk = KVCACHE ? p.cache_seqlens[b] + p.seqlen_new : p.seqlen_k;
  const int rows = group * sq;  // <= ROWS
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  // This warp's m16 tile (packed rows row0 .. row0 + 15) and its keys of each stage.
  const int row0 = warp / KEY_WARPS * 16, key_in_stage = warp % KEY_WARPS * WARP_KEYS;
  const bool has_rows = row0 < rows;  // warp-uniform: a tile of padding rows skips the math
  const int g = lane / 4, c = lane % 4;
  const SwizzledLanes<D> lanes(lane);

  T* s_q = reinterpret_cast<T*>(tc::dynamic_smem());
  T* s_k = s_q + ROWS * D;              // [2][BLOCK_N][D]
  T* s_v = s_k + 2 * BLOCK_N * D;       // [2][BLOCK_N][D]
  const uint32_t sh_q = tc::smem_addr(s_q), sh_k = tc::smem_addr(s_k), sh_v = tc::smem_addr(s_v);

  // This split's stages [t_begin, t_end) (decode_splits leaves none empty for dense keys; a
  // cached sequence shorter than the capacity may leave some empty).
  const int stages = ceil_div(sk, BLOCK_N);
  const int per_split = ceil_div(stages, p.num_splits);
  const int t_begin = split * per_split;
  const int t_end = t_begin + per_split < stages ? t_begin + per_split : stages;

  // Packed Q rows: row r = (head h_kv * group + r / sq, query r % sq); rows >= `rows` are 0.
  for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += THREADS) {
    const int r = idx / CHUNKS, chunk = idx % CHUNKS;
    const bool ok = r < rows;
    const int h = h_kv * group + (ok ? r / sq : 0), i = ok ? r % sq : 0;
    const T* src = static_cast<const T*>(p.q) + b * p.q_s.batch + h * p.q_s.head +
                   i * p.q_s.row + chunk * 8;
    tc::cp_async_16(s_q + swizzle<D>(r, chunk * 8), src, ok);
  }
  tc::cp_async_commit();  // Q alone in the first group: its fragments go to registers early
  const bool paged = KVCACHE && p.block_table != nullptr;
  const int64_t kv_batch = paged ? 0 : b;  // paged: the table picks the block of each row
  const T* k = static_cast<const T*>(p.k) + kv_batch * p.k_s.batch + h_kv * p.k_s.head;
  const T* v = static_cast<const T*>(p.v) + kv_batch * p.v_s.batch + h_kv * p.v_s.head;
  auto load_stage = [&](int t, int buf) {
    if (KVCACHE && paged) {
      load_paged_kv_stage<T, D, BLOCK_N, THREADS>(sh_k, sh_v, buf, k, v, p,
                                                  p.block_table + b * p.block_table_stride, sk,
                                                  t * BLOCK_N);
    } else {
      load_kv_stage<T, D, BLOCK_N, THREADS>(sh_k, sh_v, buf, k, v, p, sk, int64_t(t) * BLOCK_N);
    }
  };
  if (t_begin < t_end) load_stage(t_begin, 0);
  tc::cp_async_commit();

  // Q's A fragments of this warp's tile, read once (every stage multiplies the same 16 rows).
  uint32_t qa[D / 16][4];
  tc::cp_async_wait<1>();
  tc::block_sync();
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) load_a<D>(qa[kt], sh_q, row0, kt * 16, lanes);

  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  for (int t = t_begin; t < t_end; ++t) {
    const int buf = (t - t_begin) & 1;
    tc::cp_async_wait<0>();
    tc::block_sync();  // stage t (and Q) landed; every warp is done with stage t - 1
    if (t + 1 < t_end) load_stage(t + 1, buf ^ 1);
    tc::cp_async_commit();
    const uint32_t sk_tile = sh_k + 2 * buf * BLOCK_N * D;
    const uint32_t sv_tile = sh_v + 2 * buf * BLOCK_N * D;
    if (!has_rows) continue;

    float s[NT][4] = {};
#pragma unroll
    for (int kt = 0; kt < D / 16; ++kt) {
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        uint32_t b0[2], b1[2];
        load_b_nk<D>(b0, b1, sk_tile, key_in_stage + 16 * j, kt * 16, lanes);
        tc::mma_16816<T>(s[2 * j], qa[kt], b0);
        tc::mma_16816<T>(s[2 * j + 1], qa[kt], b1);
      }
    }
    // Scale to base 2, mask ragged ends and (causal) the keys past each query's diagonal.
    const int key0 = t * BLOCK_N + key_in_stage;
    const bool masked = key0 + WARP_KEYS > sk - (p.causal ? sq - 1 : 0);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] *= p.softmax_scale_log2;
        const int r = row0 + g + (e / 2) * 8;
        if (masked && !visible(r % sq, key0 + nt * 8 + 2 * c + e % 2, sq, sk, p.causal)) {
          s[nt][e] = -INFINITY;
        }
      }
    }
    online_softmax_step(s, o, row_max, row_sum);
#pragma unroll
    for (int j = 0; j < NT / 2; ++j) {
      uint32_t a[4];
      accumulators_as_a<T>(a, s[2 * j], s[2 * j + 1]);
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        uint32_t b0[2], b1[2];
        load_b_kn<D>(b0, b1, sv_tile, key_in_stage + 16 * j, dp * 16, lanes);
        tc::mma_16816<T>(o[2 * dp], a, b0);
        tc::mma_16816<T>(o[2 * dp + 1], a, b1);
      }
    }
  }

  // Merge the warps of each m16 tile: each writes its max, sum and accumulators (fp32) over the
  // K/V stages, at [warp][row - row0].
  tc::block_sync();  // every warp is done with the stages
  // Rows of o_w are D + 8 floats apart: with rows a multiple of 32 banks apart, the 8 rows a
  // warp's float2 stores hit would collide 8 ways; with +8 the 16 lanes of each half-warp
  // (4 rows x 4 column pairs) cover all 32 banks.
  constexpr int O_STRIDE = Tile::O_STRIDE;
  float* m_w = reinterpret_cast<float*>(s_k);  // [WARPS][16]
  float* l_w = m_w + WARPS * 16;               // [WARPS][16]
  float* o_w = l_w + WARPS * 16;               // [WARPS][16][O_STRIDE]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += tc::shfl_xor(sum, 1);
    sum += tc::shfl_xor(sum, 2);
    if (c == 0) {
      m_w[warp * 16 + g + 8 * r] = row_max[r];
      l_w[warp * 16 + g + 8 * r] = sum;
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      *reinterpret_cast<float2*>(o_w + (warp * 16 + g + 8 * r) * O_STRIDE + dt * 8 +
                                 2 * c) = float2{o[dt][2 * r], o[dt][2 * r + 1]};
    }
  }
  tc::block_sync();
  // One thread per (row, column pair): the merged row, normalized; its lse (natural log). Row r
  // is row r % 16 of the KEY_WARPS warps from r / 16 * KEY_WARPS on.
  for (int idx = threadIdx.x; idx < rows * (D / 2); idx += THREADS) {
    const int r = idx / (D / 2), col = (idx % (D / 2)) * 2;
    const int at0 = r / 16 * KEY_WARPS * 16 + r % 16;  // [first warp][row] in the scratch
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < KEY_WARPS; ++w) mx = fmaxf(mx, m_w[at0 + w * 16]);
    const float base = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, acc0 = 0.f, acc1 = 0.f;
#pragma unroll
    for (int w = 0; w < KEY_WARPS; ++w) {
      const float weight = exp2f(m_w[at0 + w * 16] - base);
      sum += l_w[at0 + w * 16] * weight;
      const float2 part =
          *reinterpret_cast<const float2*>(o_w + (at0 + w * 16) * O_STRIDE + col);
      acc0 += part.x * weight;
      acc1 += part.y * weight;
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const float lse = sum > 0.f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
    const int h = h_kv * group + r / sq, i = r % sq;
    const int64_t lse_at = (int64_t(b) * p.heads_q + h) * sq + i;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.o) + b * p.o_s.batch + h * p.o_s.head + i * p.o_s.row;
      *reinterpret_cast<uint32_t*>(out + col) = tc::pack2<T>(acc0 * inv, acc1 * inv);
      if (col == 0) p.lse[lse_at] = lse;
    } else {
      const int64_t at = int64_t(split) * p.batch * p.heads_q * sq + lse_at;
      p.o_partial[at * D + col] = acc0 * inv;
      p.o_partial[at * D + col + 1] = acc1 * inv;
      if (col == 0) p.lse_partial[at] = lse;
    }
  }
}

// Merge the splits of one (batch, head, query) row per warp: out = sum_s w_s o_s / sum_s w_s,
// w_s = exp(lse_s - max lse), lse = max + log sum_s w_s. A split that saw no key has lse -inf
// and weight 0.
template <typename T, int D>
__global__ void __launch_bounds__(256) flash_decode_combine_kernel(const AttnParams p) {
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q, row = warp_row();
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // whole warps leave together
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_partial[s * rows + row]);
  const float base = mx == -INFINITY ? 0.f : mx;
  float sum = 0.f;
  for (int s = 0; s < p.num_splits; ++s) sum += expf(p.lse_partial[s * rows + row] - base);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  const int i = row % p.seqlen_q;
  const int h = row / p.seqlen_q % p.heads_q;
  const int b = row / (int64_t(p.seqlen_q) * p.heads_q);
  T* out = static_cast<T*>(p.o) + b * p.o_s.batch + h * p.o_s.head + i * p.o_s.row;
#pragma unroll
  for (int col = 2 * lane; col < D; col += 2 * kWarpSize) {
    float acc0 = 0.f, acc1 = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = expf(p.lse_partial[s * rows + row] - base);
      acc0 += w * p.o_partial[(s * rows + row) * D + col];
      acc1 += w * p.o_partial[(s * rows + row) * D + col + 1];
    }
    *reinterpret_cast<uint32_t*>(out + col) = tc::pack2<T>(acc0 * inv, acc1 * inv);
  }
  if (lane == 0) p.lse[row] = sum > 0.f ? base + logf(sum) : -INFINITY;
}

}  // namespace attention
}  // namespace llama_kernels
