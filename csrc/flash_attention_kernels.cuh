// Causal / full flash attention on tensor cores (FlashAttention-2 structure), forward and
// backward, for head_dim 64 and 128, fp16 and bf16, sm_80 and later.
//
// Kernel source only: no torch, no launches of its own. flash_attention.cu launches these with
// CUDA; tests/cuda_emulator runs the very same source on the host against an emulation of
// tensor_core.cuh. Every launch decision (grid, block, shared memory) is made here, in
// run_forward / run_backward, so both callers launch identically.
//
// Conventions (the contract of llama_kernels.flash_attention):
//   q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), any strides with unit stride along D and rows
//   16-byte aligned; query head h reads kv head h / (Hq / Hkv). Causal masks are aligned
//   bottom-right: query i sees key j iff j <= i + Sk - Sq. lse (B, Hq, Sq) fp32, natural log.
#pragma once

#ifndef LLAMA_KERNELS_EMULATOR
#include "tensor_core.cuh"
#endif

#include <cstdint>
#include <stdexcept>

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
  float scale_log2;  // softmax_scale * log2(e): softmax runs on exp2
  bool causal;
  // Forward only: 0 runs the prefill kernel; n > 0 the decode kernel with n key splits, whose
  // fp32 partial results go to o_partial (n, B, Hq, Sq, D) and lse_partial (n, B, Hq, Sq)
  // when n > 1 (see decode_splits).
  int num_splits;
  float* o_partial;
  float* lse_partial;
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

struct alignas(16) Chunk16 {
  uint32_t w[4];
};

// Swizzled addresses without registers to spare. In a [rows][D] tile whose row offsets are
// multiples of 8, the swizzle's XOR term (row % 8) is a per-thread constant, and the 16-byte
// chunk index enters only through an XOR on the low bits of the row: byte offset of (row, col)
// = row * 2D + ((col / 8) ^ (row % 8)) * 16, where row = row0 + a per-thread part. So each
// address is (per-thread base ^ a compile-time constant) + a compile-time or per-block row
// offset: one LOP per fragment and an immediate, instead of a hoisted register per
// (fragment, k-step), which spilled the forward's accumulators.
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

// B operands of two n8 tiles, k16 deep, where the tile stores B transposed ([n][k], e.g. K
// rows for Q K^T): b0 for n rows n0..n0+7, b1 for n0+8..n0+15, k cols k0..k0+15.
template <int D>
__device__ __forceinline__ void load_b_nk(uint32_t (&b0)[2], uint32_t (&b1)[2], uint32_t tile,
                                          int n0, int k0, const SwizzledLanes<D>& lanes) {
  uint32_t r[4];
  tc::ldmatrix_x4(r, tile + n0 * 2 * D + (lanes.b_nk ^ (k0 * 2)));
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// B operands of two n8 tiles, k16 deep, where the tile stores B as is ([k][n], e.g. V rows for
// P V): b0 for n cols n0..n0+7, b1 for n0+8..n0+15, k rows k0..k0+15.
template <int D>
__device__ __forceinline__ void load_b_kn(uint32_t (&b0)[2], uint32_t (&b1)[2], uint32_t tile,
                                          int k0, int n0, const SwizzledLanes<D>& lanes) {
  uint32_t r[4];
  tc::ldmatrix_x4_trans(r, tile + k0 * 2 * D + (lanes.b_kn ^ (n0 * 2)));
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
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

// ------------------------------------------------------------------------------ forward
//
// O = softmax(scale * Q K^T + mask) V, lse = log(sum_j exp(scale * s_ij)) per row.
// One block per (query block of BLOCK_M rows, query head, batch); WARPS warps stacked along the
// queries, MT m16 tiles each. The block walks its key blocks last to first (the masked ones
// first) with one K and one V buffer, FlashAttention-2's order of cp.async: V[n] is fetched
// while Q K[n]^T runs, K[n-1] while the softmax and P V[n] run. The online softmax keeps a
// running max and sum per row in fp32 registers (base 2: scores are scaled by scale * log2 e
// first, so any sign of scale works, then masked to -inf). P is rounded to T in registers and
// used directly as the A operand of P V.
template <int D_, int BLOCK_M_, int BLOCK_N_, int WARPS_>
struct FwdTile {
  static constexpr int D = D_, BLOCK_M = BLOCK_M_, BLOCK_N = BLOCK_N_, WARPS = WARPS_;
  static constexpr int THREADS = WARPS * kWarpSize;
  static constexpr int MT = BLOCK_M / (16 * WARPS);  // m16 tiles per warp
  static constexpr int SMEM_BYTES = (BLOCK_M + 2 * BLOCK_N) * D * 2;
  static_assert(BLOCK_M % (16 * WARPS) == 0 && BLOCK_N % 16 == 0 && D % 16 == 0, "tile shape");
};

template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::THREADS)
    flash_fwd_kernel(const AttnParams p) {
  constexpr int D = Tile::D, BLOCK_M = Tile::BLOCK_M, BLOCK_N = Tile::BLOCK_N;
  constexpr int THREADS = Tile::THREADS, MT = Tile::MT, NT = BLOCK_N / 8, DT = D / 8;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // the longest rows start first
  const int h = blockIdx.y, b = blockIdx.z;
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const SwizzledLanes<D> lanes(lane);
  const int sq = p.seqlen_q, sk = p.seqlen_k;
  const int row0 = warp * MT * 16;  // this warp's first row in the block

  const T* q = static_cast<const T*>(p.q) + b * p.q_s.batch + h * p.q_s.head +
               int64_t(m_block) * BLOCK_M * p.q_s.row;
  const T* k = static_cast<const T*>(p.k) + b * p.k_s.batch + h_kv * p.k_s.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_s.batch + h_kv * p.v_s.head;
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
          s[mt][nt][e] *= p.scale_log2;
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
  float* lse = p.lse + (int64_t(b) * p.heads_q + h) * sq;
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
  T* out = static_cast<T*>(p.o) + b * p.o_s.batch + h * p.o_s.head +
           int64_t(m_block) * BLOCK_M * p.o_s.row;
  store_tile<T, D, BLOCK_M, THREADS>(out, s_q, p.o_s.row, sq - m_block * BLOCK_M);
}

// ------------------------------------------------------------------------------ decode
//
// A few queries against a long KV cache (decoding, speculative steps): the prefill tiling would
// leave 127 of 128 rows of a block idle and read each kv head once per query head. Here the
// query heads of one kv group and their queries are packed into the 16 rows of one m16 tile
// (row r = g * Sq + i: head h_kv * group + g, query i), so K and V are read once per group,
// and the keys are split over blocks (split-KV, "flash-decoding") and, inside a block, over
// warps: each warp takes 16 keys of every 64-key stage and keeps its own running max, sum and
// accumulators, merged through shared memory at the end. With several splits each block writes
// its normalized partial output and lse in fp32; flash_decode_combine_kernel merges them.
constexpr int kDecodeRows = 16;

template <int D_>
struct DecodeTile {
  static constexpr int D = D_, WARPS = 4, THREADS = WARPS * kWarpSize;
  static constexpr int BLOCK_N = 16 * WARPS;  // keys per stage: 16 per warp
  static constexpr int STAGE_BYTES = 2 * BLOCK_N * D * 2;  // K and V
  // Q rows, two K/V stages; the warps' fp32 accumulators reuse the stages at the end.
  static constexpr int SMEM_BYTES = kDecodeRows * D * 2 + 2 * STAGE_BYTES;
  static constexpr int O_STRIDE = D + 8;  // floats between merge-scratch rows (bank spread)
  static_assert(WARPS * kDecodeRows * O_STRIDE * 4 + 2 * WARPS * kDecodeRows * 4 <=
                    2 * STAGE_BYTES,
                "the merge scratch fits in the K/V stages");
};

// Key splits for a decode launch: 0 (use the prefill kernel) unless every query head of a kv
// group and its queries fit one m16 tile; else enough splits for two blocks per SM, but at
// least 4 stages (256 keys) per split, and no empty split.
inline int decode_splits(const AttnParams& p, int num_sms) {
  const int group = p.heads_q / p.heads_kv;
  const int stages = ceil_div(p.seqlen_k, 64);
  if (int64_t(group) * p.seqlen_q > kDecodeRows || stages == 0) return 0;
  const int64_t blocks = int64_t(p.batch) * p.heads_kv;
  int64_t splits = (2 * int64_t(num_sms) + blocks - 1) / blocks;
  const int64_t most = ceil_div(stages, 4);
  splits = splits < most ? splits : most;
  splits = splits < 1 ? 1 : splits;
  const int per_split = ceil_div(stages, int(splits));
  return ceil_div(stages, per_split);
}

// __launch_bounds__(128, 2): without the minimum, ptxas (nvcc 13.0, sm_80) capped the d128
// kernel at 128 registers and spilled 8 bytes; with it, 135 registers and no spill.
template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::THREADS, 2) flash_decode_kernel(const AttnParams p) {
  constexpr int D = Tile::D, BLOCK_N = Tile::BLOCK_N, THREADS = Tile::THREADS;
  constexpr int WARPS = Tile::WARPS, DT = D / 8, CHUNKS = D / 8;
  const int split = blockIdx.x, h_kv = blockIdx.y, b = blockIdx.z;
  const int group = p.heads_q / p.heads_kv;
  const int sq = p.seqlen_q, sk = p.seqlen_k;
  const int rows = group * sq;  // <= kDecodeRows
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const SwizzledLanes<D> lanes(lane);

  T* s_q = reinterpret_cast<T*>(tc::dynamic_smem());
  T* s_k = s_q + kDecodeRows * D;       // [2][BLOCK_N][D]
  T* s_v = s_k + 2 * BLOCK_N * D;       // [2][BLOCK_N][D]
  const uint32_t sh_q = tc::smem_addr(s_q), sh_k = tc::smem_addr(s_k), sh_v = tc::smem_addr(s_v);

  // This split's stages [t_begin, t_end) (decode_splits leaves none empty).
  const int stages = ceil_div(sk, BLOCK_N);
  const int per_split = ceil_div(stages, p.num_splits);
  const int t_begin = split * per_split;
  const int t_end = t_begin + per_split < stages ? t_begin + per_split : stages;

  // Packed Q rows: row r = (head h_kv * group + r / sq, query r % sq); rows >= `rows` are 0.
  for (int idx = threadIdx.x; idx < kDecodeRows * CHUNKS; idx += THREADS) {
    const int r = idx / CHUNKS, chunk = idx % CHUNKS;
    const bool ok = r < rows;
    const int h = h_kv * group + (ok ? r / sq : 0), i = ok ? r % sq : 0;
    const T* src = static_cast<const T*>(p.q) + b * p.q_s.batch + h * p.q_s.head +
                   i * p.q_s.row + chunk * 8;
    tc::cp_async_16(s_q + swizzle<D>(r, chunk * 8), src, ok);
  }
  tc::cp_async_commit();  // Q alone in the first group: its fragments go to registers early
  const T* k = static_cast<const T*>(p.k) + b * p.k_s.batch + h_kv * p.k_s.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_s.batch + h_kv * p.v_s.head;
  auto load_stage = [&](int t, int buf) {
    const int64_t key0 = int64_t(t) * BLOCK_N;
    load_tile<T, D, BLOCK_N, THREADS>(sh_k + 2 * buf * BLOCK_N * D, k + key0 * p.k_s.row, p.k_s.row,
                                      sk - key0);
    load_tile<T, D, BLOCK_N, THREADS>(sh_v + 2 * buf * BLOCK_N * D, v + key0 * p.v_s.row, p.v_s.row,
                                      sk - key0);
  };
  if (t_begin < t_end) load_stage(t_begin, 0);
  tc::cp_async_commit();

  // Q's A fragments, read once (every stage multiplies the same 16 rows).
  uint32_t qa[D / 16][4];
  tc::cp_async_wait<1>();
  tc::block_sync();
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) load_a<D>(qa[kt], sh_q, 0, kt * 16, lanes);

  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int key_in_stage = warp * 16;  // this warp's 16 keys of each stage

  for (int t = t_begin; t < t_end; ++t) {
    const int buf = (t - t_begin) & 1;
    tc::cp_async_wait<0>();
    tc::block_sync();  // stage t (and Q) landed; every warp is done with stage t - 1
    if (t + 1 < t_end) load_stage(t + 1, buf ^ 1);
    tc::cp_async_commit();
    const uint32_t sk_tile = sh_k + 2 * buf * BLOCK_N * D;
    const uint32_t sv_tile = sh_v + 2 * buf * BLOCK_N * D;

    float s[2][4] = {};
#pragma unroll
    for (int kt = 0; kt < D / 16; ++kt) {
      uint32_t b0[2], b1[2];
      load_b_nk<D>(b0, b1, sk_tile, key_in_stage, kt * 16, lanes);
      tc::mma_16816<T>(s[0], qa[kt], b0);
      tc::mma_16816<T>(s[1], qa[kt], b1);
    }
    // Scale to base 2, mask ragged ends and (causal) the keys past each query's diagonal.
    const int key0 = t * BLOCK_N + key_in_stage;
    const bool masked = key0 + 16 > sk - (p.causal ? sq - 1 : 0);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] *= p.scale_log2;
        const int r = g + (e / 2) * 8;
        if (masked && !visible(r % sq, key0 + nt * 8 + 2 * c + e % 2, sq, sk, p.causal)) {
          s[nt][e] = -INFINITY;
        }
      }
    }
    online_softmax_step(s, o, row_max, row_sum);
    uint32_t a[4];
    accumulators_as_a<T>(a, s[0], s[1]);
#pragma unroll
    for (int dp = 0; dp < DT / 2; ++dp) {
      uint32_t b0[2], b1[2];
      load_b_kn<D>(b0, b1, sv_tile, key_in_stage, dp * 16, lanes);
      tc::mma_16816<T>(o[2 * dp], a, b0);
      tc::mma_16816<T>(o[2 * dp + 1], a, b1);
    }
  }

  // Merge the warps: each writes its max, sum and accumulators (fp32) over the K/V stages.
  tc::block_sync();  // every warp is done with the stages
  // Rows of o_w are D + 8 floats apart: with rows a multiple of 32 banks apart, the 8 rows a
  // warp's float2 stores hit would collide 8 ways; with +8 the 16 lanes of each half-warp
  // (4 rows x 4 column pairs) cover all 32 banks.
  constexpr int O_STRIDE = Tile::O_STRIDE;
  float* m_w = reinterpret_cast<float*>(s_k);         // [WARPS][16]
  float* l_w = m_w + WARPS * kDecodeRows;             // [WARPS][16]
  float* o_w = l_w + WARPS * kDecodeRows;             // [WARPS][16][O_STRIDE]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += tc::shfl_xor(sum, 1);
    sum += tc::shfl_xor(sum, 2);
    if (c == 0) {
      m_w[warp * kDecodeRows + g + 8 * r] = row_max[r];
      l_w[warp * kDecodeRows + g + 8 * r] = sum;
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      *reinterpret_cast<float2*>(o_w + (warp * kDecodeRows + g + 8 * r) * O_STRIDE + dt * 8 +
                                 2 * c) = float2{o[dt][2 * r], o[dt][2 * r + 1]};
    }
  }
  tc::block_sync();
  // One thread per (row, column pair): the merged row, normalized; its lse (natural log).
  for (int idx = threadIdx.x; idx < rows * (D / 2); idx += THREADS) {
    const int r = idx / (D / 2), col = (idx % (D / 2)) * 2;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, m_w[w * kDecodeRows + r]);
    const float base = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, acc0 = 0.f, acc1 = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float weight = exp2f(m_w[w * kDecodeRows + r] - base);
      sum += l_w[w * kDecodeRows + r] * weight;
      const float2 part =
          *reinterpret_cast<const float2*>(o_w + (w * kDecodeRows + r) * O_STRIDE + col);
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
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t row = int64_t(blockIdx.x) * (256 / kWarpSize) + threadIdx.x / kWarpSize;
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

// ------------------------------------------------------------------------------ backward
//
// With P = softmax(S) recomputed from the saved lse (P_ij = exp2(scale_log2 s_ij - lse_i log2 e)),
// dV = P^T dO, dP = dO V^T, dS = P o (dP - delta) with delta_i = rowsum(dO_i o O_i),
// dQ = scale dS K, dK = scale dS^T Q. Deterministic, without atomics: one kernel owns a key
// block (dK, dV in registers, summed over the query heads of its kv group and over its query
// blocks in a fixed order), a second owns a query block (dQ in registers), each recomputing P.

// delta = rowsum(dout * out) in fp32, one warp per (batch, head, query) row; (B, Hq, Sq).
template <typename T, int D>
__global__ void __launch_bounds__(256) flash_bwd_delta_kernel(const AttnParams p) {
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t row = int64_t(blockIdx.x) * (256 / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // whole warps leave together
  const int i = row % p.seqlen_q;
  const int h = row / p.seqlen_q % p.heads_q;
  const int b = row / (int64_t(p.seqlen_q) * p.heads_q);
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_s.batch + h * p.dout_s.head +
                  i * p.dout_s.row;
  const T* out = static_cast<const T*>(p.out) + b * p.out_s.batch + h * p.out_s.head +
                 i * p.out_s.row;
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
// buffered so the next step's tiles load during this step's five products.
template <int D_, int BLOCK_STEP_, int WARPS_>
struct BwdTile {
  static constexpr int D = D_, BLOCK_STEP = BLOCK_STEP_, WARPS = WARPS_;
  static constexpr int THREADS = WARPS * kWarpSize;
  static constexpr int BLOCK_OWN = 16 * WARPS;
  // Two resident tiles, two double-buffered ones, and two fp32 vectors per step buffer.
  static constexpr int SMEM_BYTES = (2 * BLOCK_OWN + 4 * BLOCK_STEP) * D * 2 + 4 * BLOCK_STEP * 4;
  static_assert(BLOCK_STEP % 16 == 0 && D % 16 == 0, "tile shape");
};

template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::THREADS)
    flash_bwd_dkdv_kernel(const AttnParams p) {
  constexpr int D = Tile::D, BLOCK_N = Tile::BLOCK_OWN, BLOCK_M = Tile::BLOCK_STEP;
  constexpr int THREADS = Tile::THREADS, QT = BLOCK_M / 8, DT = D / 8;
  const int n_block = blockIdx.x, h_kv = blockIdx.y, b = blockIdx.z;
  const int group = p.heads_q / p.heads_kv;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const SwizzledLanes<D> lanes(lane);
  const int sq = p.seqlen_q, sk = p.seqlen_k;
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
  const T* k = static_cast<const T*>(p.k) + b * p.k_s.batch + h_kv * p.k_s.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_s.batch + h_kv * p.v_s.head;
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
    const T* q = static_cast<const T*>(p.q) + b * p.q_s.batch + h * p.q_s.head;
    const T* dout = static_cast<const T*>(p.dout) + b * p.dout_s.batch + h * p.dout_s.head;
    load_tile<T, D, BLOCK_M, THREADS>(sh_q + 2 * buf * BLOCK_M * D, q + row0 * p.q_s.row,
                                      p.q_s.row, sq - row0);
    load_tile<T, D, BLOCK_M, THREADS>(sh_do + 2 * buf * BLOCK_M * D, dout + row0 * p.dout_s.row,
                                      p.dout_s.row, sq - row0);
    const int64_t row = row0 + threadIdx.x;
    const bool ok = threadIdx.x < BLOCK_M && row < sq;  // past the end: P = 0, delta = 0
    const int64_t at = (int64_t(b) * p.heads_q + h) * sq + row;
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
        float prob = exp2f(pt[qt][e] * p.scale_log2 - lse[col]);
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

  // Stage through the K and V tiles (each warp only ever read its own rows of them).
  accumulators_to_smem<T, D>(s_k, dk, key0, lane);
  accumulators_to_smem<T, D>(s_v, dv, key0, lane);
  tc::block_sync();
  T* dk_out = static_cast<T*>(p.dk) + b * p.dk_s.batch + h_kv * p.dk_s.head +
              key_offset * p.dk_s.row;
  T* dv_out = static_cast<T*>(p.dv) + b * p.dv_s.batch + h_kv * p.dv_s.head +
              key_offset * p.dv_s.row;
  store_tile<T, D, BLOCK_N, THREADS>(dk_out, s_k, p.dk_s.row, sk - key_offset);
  store_tile<T, D, BLOCK_N, THREADS>(dv_out, s_v, p.dv_s.row, sk - key_offset);
}

template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::THREADS)
    flash_bwd_dq_kernel(const AttnParams p) {
  constexpr int D = Tile::D, BLOCK_M = Tile::BLOCK_OWN, BLOCK_N = Tile::BLOCK_STEP;
  constexpr int THREADS = Tile::THREADS, NT = BLOCK_N / 8, DT = D / 8;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // the longest rows start first
  const int h = blockIdx.y, b = blockIdx.z;
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const SwizzledLanes<D> lanes(lane);
  const int sq = p.seqlen_q, sk = p.seqlen_k;
  const int row0 = warp * 16;

  T* s_q = reinterpret_cast<T*>(tc::dynamic_smem());
  T* s_do = s_q + BLOCK_M * D;
  T* s_k = s_do + BLOCK_M * D;       // [2][BLOCK_N][D]
  T* s_v = s_k + 2 * BLOCK_N * D;    // [2][BLOCK_N][D]
  const uint32_t sh_q = tc::smem_addr(s_q), sh_do = tc::smem_addr(s_do);
  const uint32_t sh_k = tc::smem_addr(s_k), sh_v = tc::smem_addr(s_v);

  const int64_t q_offset = int64_t(m_block) * BLOCK_M;
  const T* q = static_cast<const T*>(p.q) + b * p.q_s.batch + h * p.q_s.head;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_s.batch + h * p.dout_s.head;
  const T* k = static_cast<const T*>(p.k) + b * p.k_s.batch + h_kv * p.k_s.head;
  const T* v = static_cast<const T*>(p.v) + b * p.v_s.batch + h_kv * p.v_s.head;
  load_tile<T, D, BLOCK_M, THREADS>(sh_q, q + q_offset * p.q_s.row, p.q_s.row, sq - q_offset);
  load_tile<T, D, BLOCK_M, THREADS>(sh_do, dout + q_offset * p.dout_s.row, p.dout_s.row,
                                    sq - q_offset);
  auto load_step = [&](int n, int buf) {
    const int64_t key0 = int64_t(n) * BLOCK_N;
    load_tile<T, D, BLOCK_N, THREADS>(sh_k + 2 * buf * BLOCK_N * D, k + key0 * p.k_s.row, p.k_s.row,
                                      sk - key0);
    load_tile<T, D, BLOCK_N, THREADS>(sh_v + 2 * buf * BLOCK_N * D, v + key0 * p.v_s.row, p.v_s.row,
                                      sk - key0);
  };
  const int n_end = key_block_end(m_block, BLOCK_M, BLOCK_N, sq, sk, p.causal);
  if (n_end > 0) load_step(0, 0);
  tc::cp_async_commit();

  // This lane's rows g and g + 8: lse in log2 units (+inf past the end: P = 0), delta.
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = int(q_offset) + row0 + g + 8 * r;
    const int64_t at = (int64_t(b) * p.heads_q + h) * sq + i;
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
        float prob = exp2f(s[nt][e] * p.scale_log2 - lse[e / 2]);
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
  T* dq_out = static_cast<T*>(p.dq) + b * p.dq_s.batch + h * p.dq_s.head + q_offset * p.dq_s.row;
  store_tile<T, D, BLOCK_M, THREADS>(dq_out, s_q, p.dq_s.row, sq - q_offset);
}

// ------------------------------------------------------------------------------ launches
//
// Tile choices start from FlashAttention-2's for sm_80 (KERNEL-NOTES.md) and are bounded by the
// register file: 255 registers per thread at 128 threads, and tests/test_cuda_build.py checks
// from the cubin that no kernel spills. Each warp owns 16 rows (x MT) and holds their fp32
// accumulators: O (D/2 regs per m16 tile) plus the scores (BLOCK_N/2); the backward holds two
// D-wide accumulators (dK and dV) and two score tiles.
//   forward  d64: 128 x 64, 4 warps (2 m16 tiles each), 32 KiB of shared memory.
//            d128: 128 x 64, 8 warps; 4 warps with 2 m16 tiles each spilled 176 bytes.
//   dK/dV    64 keys (4 warps) x 64-query steps at d64 (49 KiB); 32-query steps at d128
//            (64.5 KiB), where 64-query steps spilled 32 bytes.
//   dQ       64 queries (4 warps) x 64-key steps (d64 49 KiB, d128 97 KiB).
template <int D>
struct Config;
template <>
struct Config<64> {
  using Fwd = FwdTile<64, 128, 64, 4>;
  using Dkdv = BwdTile<64, 64, 4>;
  using Dq = BwdTile<64, 64, 4>;
};
template <>
struct Config<128> {
  using Fwd = FwdTile<128, 128, 64, 8>;
  using Dkdv = BwdTile<128, 32, 4>;
  using Dq = BwdTile<128, 64, 4>;
};

template <typename F>
void with_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 64: return f(Config<64>{});
    case 128: return f(Config<128>{});
    default: throw std::invalid_argument("flash attention: head_dim must be 64 or 128");
  }
}

// p.num_splits from decode_splits: 0 runs the prefill kernel, else the decode kernel (and the
// combine kernel when there are several splits; the caller allocates o_partial, lse_partial).
template <typename T, typename Launch>
void run_forward(const AttnParams& p, int head_dim, Launch&& launch) {
  with_head_dim(head_dim, [&](auto config) {
    using Tile = typename decltype(config)::Fwd;
    if (p.num_splits == 0) {
      const dim3 grid(ceil_div(p.seqlen_q, Tile::BLOCK_M), p.heads_q, p.batch);
      launch(flash_fwd_kernel<T, Tile>, grid, dim3(Tile::THREADS), Tile::SMEM_BYTES, p);
      return;
    }
    using Decode = DecodeTile<Tile::D>;
    launch(flash_decode_kernel<T, Decode>, dim3(p.num_splits, p.heads_kv, p.batch),
           dim3(Decode::THREADS), Decode::SMEM_BYTES, p);
    if (p.num_splits > 1) {
      const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
      launch(flash_decode_combine_kernel<T, Tile::D>, dim3(unsigned((rows + 7) / 8)), dim3(256),
             0, p);
    }
  });
}

template <typename T, typename Launch>
void run_backward(const AttnParams& p, int head_dim, Launch&& launch) {
  with_head_dim(head_dim, [&](auto config) {
    using Dkdv = typename decltype(config)::Dkdv;
    using Dq = typename decltype(config)::Dq;
    const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
    launch(flash_bwd_delta_kernel<T, Dq::D>, dim3(unsigned((rows + 7) / 8)), dim3(256), 0, p);
    launch(flash_bwd_dkdv_kernel<T, Dkdv>,
           dim3(ceil_div(p.seqlen_k, Dkdv::BLOCK_OWN), p.heads_kv, p.batch), dim3(Dkdv::THREADS),
           Dkdv::SMEM_BYTES, p);
    launch(flash_bwd_dq_kernel<T, Dq>,
           dim3(ceil_div(p.seqlen_q, Dq::BLOCK_OWN), p.heads_q, p.batch), dim3(Dq::THREADS),
           Dq::SMEM_BYTES, p);
  });
}

// The launch interface both callers provide: launch(kernel, grid, block, smem_bytes, params)
// runs `kernel` (a `void (*)(AttnParams)` __global__ function) and checks the launch.
//   template <typename T, typename Launch>
//   void run_forward(const AttnParams& p, int head_dim, Launch&& launch);   // writes o, lse
//   template <typename T, typename Launch>
//   void run_backward(const AttnParams& p, int head_dim, Launch&& launch);  // dq, dk, dv
// T is __half or __nv_bfloat16; head_dim is 64 or 128 (others are refused by the callers).

}  // namespace attention
}  // namespace llama_kernels
