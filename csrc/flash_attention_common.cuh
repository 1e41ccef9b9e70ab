// What every flash-attention kernel shares: the parameters, the mask and tile arithmetic, the
// swizzled shared-memory tiles and their ldmatrix / cp.async addressing, and the online-softmax
// step of the forward and decode kernels.
//
// The math, for one (batch, query head h) with its kv head h / (Hq / Hkv):
//   s_ij = scale * q_i . k_j, masked to -inf where query i must not see key j;
//   o_i = sum_j exp(s_ij - lse_i) v_j, lse_i = log sum_j exp(s_ij) (natural log).
// Kernels work in base 2: s'_ij = softmax_scale_log2 * q_i . k_j = s_ij log2 e, so
// exp(s_ij - m) = exp2(s'_ij - m log2 e), and lse_i = ln 2 * (m' + log2 sum_j exp2(s'_ij - m')).
// The online softmax visits keys in blocks and keeps per row a running max m' and sum l; a new
// block with max m'_new rescales l and the accumulated o by exp2(m'_old - m'_new).
//
// Conventions (the contract of llama_kernels.flash_attention):
//   q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), any strides with unit stride along D and rows
//   16-byte aligned; query head h reads kv head h / (Hq / Hkv), Hq % Hkv == 0. Causal masks are
//   aligned bottom-right: query i sees key j iff j <= i + Sk - Sq (causal needs Sq <= Sk).
//   lse (B, Hq, Sq) fp32, natural log; a row that sees no key gets o = 0 and lse = -inf.
//   Packed sequences (flash-attn's varlen layout, the kernels' VARLEN specializations): q
//   (total_q, Hq, D), k and v (total_k, Hkv, D), sequence b the rows between cu_seqlens[b] and
//   cu_seqlens[b + 1], each with its own Sq and Sk (either may be 0, and Sq > Sk under a causal
//   mask leaves the first Sq - Sk rows blind); lse (Hq, total_q).
//   D is 64 or 128; T (the element type) is __half or __nv_bfloat16.
#pragma once

#ifndef LLAMA_KERNELS_EMULATOR
#include "tensor_core.cuh"
#endif

#include <cstdint>

namespace llama_kernels {
namespace attention {

// Element strides of one (B, S, H, D) tensor; the D stride is 1.
struct Strides {
  int64_t batch, row, head;
};

struct AttnParams {
  // Forward inputs / backward inputs.
  const void* q;
  const void* k;
  const void* v;
  const void* out;   // backward: the forward's output
  const void* dout;  // backward: its gradient
  // Outputs (forward: o and lse; backward: dq, dk, dv, with delta as fp32 scratch).
  void* o;
  void* dq;
  void* dk;
  void* dv;
  float* lse;    // (B, Hq, Sq) contiguous
  float* delta;  // (B, Hq, Sq) contiguous: rowsum(dout * out)
  Strides q_s, k_s, v_s, out_s, dout_s, o_s, dq_s, dk_s, dv_s;
  int batch, heads_q, heads_kv, seqlen_q, seqlen_k;
  float softmax_scale;
  float softmax_scale_log2;  // softmax_scale * log2(e): softmax runs on exp2
  bool causal;
  // Forward only: 0 runs the prefill kernel; n > 0 the decode kernel with n key splits, whose
  // fp32 partial results go to o_partial (n, B, Hq, Sq, D) and lse_partial (n, B, Hq, Sq)
  // when n > 1 (decode_splits in flash_attention_kernels.cuh).
  int num_splits;
  float* o_partial;
  float* lse_partial;
  // Packed sequences (the VARLEN kernels; nullptr: dense). Sequence b is rows
  // cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q, o, out, dout, dq and rows cu_seqlens_k[b] ..
  // of k, v, dk, dv (int32, B + 1 entries from 0); the batch strides are not used; lse and
  // delta are (Hq, total_q); seqlen_q and seqlen_k are the longest sequences (they size the
  // grids), batch is B.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int64_t total_q;
  // Attention against a KV cache (run_kvcache: the append kernel, then the decode kernel's
  // KVCACHE specialization). k and v are the caches, (B, S_cache, Hkv, D), or paged pools
  // (num_blocks, page size, Hkv, D) whose k_s.batch / v_s.batch step one block. Sequence b has
  // cache_seqlens[b] cached tokens plus seqlen_new new ones, seqlen_k is the capacity (it sizes
  // the split count only). Token t of sequence b lives in row t of k[b] (block_table nullptr),
  // or in row t % 2**page_shift of block block_table[b * block_table_stride + (t >> page_shift)].
  const int* cache_seqlens;
  const int* block_table;
  int64_t block_table_stride;
  int page_shift;
  int seqlen_new;
  // The append: k_new, v_new (B, seqlen_new, Hkv, D) into the caches k_cache, v_cache (the
  // same memory as k, v) at rows cache_seqlens[b] + i; with rotary tables (fp32 (rows, D / 2),
  // rows rotary_stride apart; nullptr: no rotation) k_new is rotated there and q into q_rot
  // (B, Sq, Hq, D), which the decode kernel then reads instead of q.
  const void* k_new;
  const void* v_new;
  void* k_cache;
  void* v_cache;
  void* q_rot;
  Strides k_new_s, v_new_s, q_rot_s;
  const float* rotary_cos;
  const float* rotary_sin;
  int64_t rotary_stride;
  bool rotary_interleaved;
};

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarpSize = 32;

// ------------------------------------------------------------------------------ tile arithmetic
// Host- and device-side, so tests can walk the same arithmetic the kernels use.

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Query i sees key j: inside the keys, and on or below the bottom-right-aligned diagonal.
__host__ __device__ constexpr bool visible(int i, int j, int seqlen_q, int seqlen_k, bool causal) {
  return j < seqlen_k && (!causal || j <= i + seqlen_k - seqlen_q);
}

// Key blocks [0, end) that query block m_block of rows [m_block * block_m, ...) must visit:
// causal stops at the block holding the last visible key of the block's last (real) row.
__host__ __device__ constexpr int key_block_end(int m_block, int block_m, int block_n,
                                                int seqlen_q, int seqlen_k, bool causal) {
  const int n_blocks = ceil_div(seqlen_k, block_n);
  if (!causal) return n_blocks;
  const int block_end = (m_block + 1) * block_m;
  const int last_row = (block_end < seqlen_q ? block_end : seqlen_q) - 1;
  const int last_key = last_row + seqlen_k - seqlen_q;
  if (last_key < 0) return 0;
  return last_key / block_n + 1 < n_blocks ? last_key / block_n + 1 : n_blocks;
}

// First query block that sees any key of key block n_block (the backward's dK/dV loop).
__host__ __device__ constexpr int query_block_begin(int n_block, int block_m, int block_n,
                                                    int seqlen_q, int seqlen_k, bool causal) {
  if (!causal) return 0;
  const int first_row = n_block * block_n - (seqlen_k - seqlen_q);
  return first_row > 0 ? first_row / block_m : 0;
}

// Whether tile (m_block, n_block) holds any pair that is not visible: a ragged key end, or a
// key past the diagonal of the tile's first row. Other tiles skip the per-element mask.
__host__ __device__ constexpr bool tile_needs_mask(int m_block, int n_block, int block_m,
                                                   int block_n, int seqlen_q, int seqlen_k,
                                                   bool causal) {
  const int last_key = (n_block + 1) * block_n - 1;
  return last_key >= seqlen_k ||
         (causal && last_key > m_block * block_m + seqlen_k - seqlen_q);
}

// Element offset of (row, col) in a [rows][D] 16-bit shared-memory tile. Rows are D * 2 bytes
// (a multiple of 128), so without a swizzle the 8 rows one ldmatrix reads at one column all hit
// the same 4 banks; XOR-ing the 16-byte chunk index with row % 8 spreads them over all 32.
template <int D>
__host__ __device__ constexpr int swizzle(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7)) << 3) | (col & 7));
}

// ------------------------------------------------------------------------------ device helpers

// The rows of batch entry b: its first query and key rows in the packed tensors and its lengths,
// read from cu_seqlens on the device when VARLEN; dense, every entry has seqlen_q and seqlen_k
// rows at its batch stride (first rows 0, folded away).
struct Sequence {
  int64_t q0, k0;
  int sq, sk;
};
template <bool VARLEN>
__device__ __forceinline__ Sequence sequence(const AttnParams& p, int b) {
  if constexpr (VARLEN) {
    const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    return {q0, k0, p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0};
  } else {
    return {0, 0, p.seqlen_q, p.seqlen_k};
  }
}

// Element offset of batch entry b's row 0 in a tensor of strides s whose packed sequence starts
// at row `first` (VARLEN), else at b's batch stride.
template <bool VARLEN>
__device__ __forceinline__ int64_t batch_offset(const Strides& s, int b, int64_t first) {
  if constexpr (VARLEN) {
    return first * s.row;
  } else {
    return b * s.batch;
  }
}

// Index of (batch entry b, query head h, query row 0) in lse and delta: (B, Hq, Sq) dense,
// (Hq, total_q) packed, with sequence b's queries from packed row q0 on.
template <bool VARLEN>
__device__ __forceinline__ int64_t lse_offset(const AttnParams& p, int b, int h, int64_t q0,
                                              int sq) {
  if constexpr (VARLEN) {
    return h * p.total_q + q0;
  } else {
    return (int64_t(b) * p.heads_q + h) * sq;
  }
}

// The block of a kernel over query blocks (forward, dQ): grid (query blocks, Hq, B), taken last
// query block first, so that under a causal mask the blocks with the most keys start first;
// h_kv is the kv head that query head h reads.
struct QueryBlock {
  int m_block, h, b, h_kv;
};
__device__ __forceinline__ QueryBlock query_block(const AttnParams& p) {
  const int h = blockIdx.y;
  return {int(gridDim.x - 1 - blockIdx.x), h, int(blockIdx.z), h / (p.heads_q / p.heads_kv)};
}

// This warp's row in the row kernels (delta, decode combine), which give one warp to each
// (batch, query head, query) row, row = (b * Hq + h) * Sq + i, 8 warps to a 256-thread block.
__device__ __forceinline__ int64_t warp_row() {
  return int64_t(blockIdx.x) * (256 / kWarpSize) + threadIdx.x / kWarpSize;
}

struct alignas(16) Chunk16 {
  uint32_t w[4];
};

// Swizzled addresses without registers to spare. In a [rows][D] tile whose row offsets are
// multiples of 8, the swizzle's XOR term (row % 8) is a per-thread constant, and the 16-byte
// chunk index enters only through an XOR on the low bits of the row: byte offset of (row, col)
// = row * 2D + ((col / 8) ^ (row % 8)) * 16, where row = row0 + a per-thread part. So each
// address is (per-thread base ^ a compile-time constant) + a compile-time or per-block row
// offset: one LOP per fragment and an immediate. A hoisted address register per
// (fragment, k-step) instead would take the registers the forward's accumulators need.
template <int D>
struct SwizzledLanes {
  static constexpr int ROW_BYTES = D * 2;
  static_assert(D == 64 || D == 128, "the XOR form needs rows of 8 or 16 chunks");
  uint32_t a, b_nk, b_kn;  // per-lane bases of the three ldmatrix patterns below

  __device__ __forceinline__ explicit SwizzledLanes(int lane) {
    const int r7 = lane & 7;
    a = (lane % 16) * ROW_BYTES + (((lane / 16) ^ r7) * 16);
    b_nk = ((lane / 16) * 8 + lane % 8) * ROW_BYTES + (((lane / 8 % 2) ^ r7) * 16);
    b_kn = (lane % 8 + (lane / 8 % 2) * 8) * ROW_BYTES + (((lane / 16) ^ r7) * 16);
  }
};

// cp.async a [ROWS][D] tile from global (rows `row_stride` elements apart) into swizzled shared
// memory; rows >= rows_valid are zero-filled, never read. Thread t copies chunk t % (D / 8) of
// rows t / (D / 8) + k * THREADS / (D / 8): a fixed column and a fixed row % 8.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t smem, const T* gmem, int64_t row_stride,
                                          int rows_valid) {
  constexpr int kChunks = D / 8, kRowsPerPass = THREADS / kChunks;
  static_assert(THREADS % kChunks == 0 && kRowsPerPass % 8 == 0 && ROWS % kRowsPerPass == 0,
                "tile loads: whole rows per pass, a multiple of 8");
  const int r0 = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
  const uint32_t dst = smem + 2 * swizzle<D>(r0, c * 8);
  const T* src = gmem + r0 * row_stride + c * 8;
#pragma unroll
  for (int it = 0; it < ROWS / kRowsPerPass; ++it) {
    const int r = r0 + it * kRowsPerPass;
    const bool ok = r < rows_valid;
    tc::cp_async_16(dst + it * kRowsPerPass * 2 * D, ok ? src + it * kRowsPerPass * row_stride
                                                        : gmem, ok);
  }
}

// cp.async the K and V rows [key0, key0 + ROWS) of one kv head (k, v at its row 0; sk keys)
// into buffer buf of the double-buffered [2][ROWS][D] tiles k_tiles and v_tiles: the dQ
// kernel's key steps and the decode kernel's stages.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_kv_stage(uint32_t k_tiles, uint32_t v_tiles, int buf,
                                              const T* k, const T* v, const AttnParams& p, int sk,
                                              int64_t key0) {
  load_tile<T, D, ROWS, THREADS>(k_tiles + 2 * buf * ROWS * D, k + key0 * p.k_s.row, p.k_s.row,
                                 sk - key0);
  load_tile<T, D, ROWS, THREADS>(v_tiles + 2 * buf * ROWS * D, v + key0 * p.v_s.row, p.v_s.row,
                                 sk - key0);
}

// Store a swizzled [ROWS][D] shared tile to global rows < rows_valid with 16-byte stores.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void store_tile(T* gmem, const T* smem, int64_t row_stride,
                                           int rows_valid) {
  constexpr int kChunks = D / 8;
  static_assert(ROWS * kChunks % THREADS == 0, "tile stores are split evenly over threads");
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / THREADS; ++it) {
    const int i = it * THREADS + threadIdx.x;
    const int r = i / kChunks, c = i % kChunks;
    if (r < rows_valid) {
      *reinterpret_cast<Chunk16*>(gmem + r * row_stride + c * 8) =
          *reinterpret_cast<const Chunk16*>(smem + swizzle<D>(r, c * 8));
    }
  }
}

// A operand (16 rows x 16 cols at (row0, col0), row0 % 8 == 0, col0 % 16 == 0) of a row-major
// swizzled tile: lanes 0-15 address rows 0-15 at col0, lanes 16-31 the same rows at col0 + 8.
template <int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], uint32_t tile, int row0, int col0,
                                       const SwizzledLanes<D>& lanes) {
  tc::ldmatrix_x4(a, tile + row0 * 2 * D + (lanes.a ^ (col0 * 2)));
}

// The four 8x8 matrices of one ldmatrix .x4 (.trans if TRANS) at this lane's row address as
// the B operands b0, b1 of two n8 tiles.
template <bool TRANS>
__device__ __forceinline__ void load_b_pair(uint32_t (&b0)[2], uint32_t (&b1)[2], uint32_t row) {
  uint32_t r[4];
  if constexpr (TRANS) {
    tc::ldmatrix_x4_trans(r, row);
  } else {
    tc::ldmatrix_x4(r, row);
  }
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// B operands of two n8 tiles, k16 deep, where the tile stores B transposed ([n][k], e.g. K
// rows for Q K^T): b0 for n rows n0..n0+7, b1 for n0+8..n0+15, k cols k0..k0+15.
template <int D>
__device__ __forceinline__ void load_b_nk(uint32_t (&b0)[2], uint32_t (&b1)[2], uint32_t tile,
                                          int n0, int k0, const SwizzledLanes<D>& lanes) {
  load_b_pair<false>(b0, b1, tile + n0 * 2 * D + (lanes.b_nk ^ (k0 * 2)));
}

// B operands of two n8 tiles, k16 deep, where the tile stores B as is ([k][n], e.g. V rows for
// P V): b0 for n cols n0..n0+7, b1 for n0+8..n0+15, k rows k0..k0+15 (ldmatrix .trans).
template <int D>
__device__ __forceinline__ void load_b_kn(uint32_t (&b0)[2], uint32_t (&b1)[2], uint32_t tile,
                                          int k0, int n0, const SwizzledLanes<D>& lanes) {
  load_b_pair<true>(b0, b1, tile + k0 * 2 * D + (lanes.b_kn ^ (n0 * 2)));
}

// The accumulators of n8 tiles 2j and 2j+1 (16 rows x 16 cols, fp32) as the A operand of the
// next product: the C layout of two adjacent n8 tiles is the A layout of one k16 step.
template <typename T>
__device__ __forceinline__ void accumulators_as_a(uint32_t (&a)[4], const float (&lo)[4],
                                                  const float (&hi)[4]) {
  a[0] = tc::pack2<T>(lo[0], lo[1]);
  a[1] = tc::pack2<T>(lo[2], lo[3]);
  a[2] = tc::pack2<T>(hi[0], hi[1]);
  a[3] = tc::pack2<T>(hi[2], hi[3]);
}

// One online-softmax step for the rows g and g + 8 of an m16 tile, which live in the 4 lanes
// of a quad: the NT n8 tiles of scores s (scaled to base 2, masked to -inf) become
// P = exp2(s - running max), the running max and this lane's partial row sums advance, and the
// accumulators o are rescaled to the new max. A row with nothing visible yet keeps max -inf
// and subtracts 0 (no NaN).
template <int NT, int DT>
__device__ __forceinline__ void online_softmax_step(float (&s)[NT][4], float (&o)[DT][4],
                                                    float (&row_max)[2], float (&row_sum)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = row_max[r];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    mx = fmaxf(mx, tc::shfl_xor(mx, 1));
    mx = fmaxf(mx, tc::shfl_xor(mx, 2));
    const float base = mx == -INFINITY ? 0.f : mx;
    const float correction = exp2f(row_max[r] - base);
    row_max[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
      s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
      sum += s[nt][2 * r] + s[nt][2 * r + 1];
    }
    row_sum[r] = row_sum[r] * correction + sum;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][2 * r] *= correction;
      o[dt][2 * r + 1] *= correction;
    }
  }
}

// Write one m16 tile of a warp's accumulators (16 rows from row0, D cols) into a swizzled tile.
template <typename T, int D>
__device__ __forceinline__ void accumulators_to_smem(T* tile, const float (&acc)[D / 8][4],
                                                     int row0, int lane) {
  const int g = lane / 4, c = lane % 4;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    const int row = row0 + g, col = dt * 8 + 2 * c;
    *reinterpret_cast<uint32_t*>(tile + swizzle<D>(row, col)) =
        tc::pack2<T>(acc[dt][0], acc[dt][1]);
    *reinterpret_cast<uint32_t*>(tile + swizzle<D>(row + 8, col)) =
        tc::pack2<T>(acc[dt][2], acc[dt][3]);
  }
}

}  // namespace attention
}  // namespace llama_kernels
