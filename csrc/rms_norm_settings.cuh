// Launch settings of the RMSNorm row kernels (rms_norm_kernels.cuh): how many threads a row
// gets, how many rows a block holds, vectors or scalars, registers or a wide-row walk, and the
// backward's persistent grid; with a compile-time self-test of the rules' invariants, so a
// change that breaks one fails to compile (here and in the emulator build).
#pragma once

#include "device_common.cuh"

namespace llama_kernels {
// Internal linkage, as in the kernel headers: the constants may share names with theirs.
namespace {

// A block holds at least this many threads: several rows of narrow widths share one block so
// that an SM (at most 32 resident blocks) can still be filled with 2048 threads.
constexpr int kMinBlockThreads = 128;
constexpr int kMaxRowsPerBlock = kMinBlockThreads / kWarp;
// Each thread aims to hold 4 vectors (64 B: 32 bf16 / 16 fp32 values) of its row: enough loads
// in flight per thread to cover memory latency, few enough registers for full occupancy.
constexpr int kTargetItems = 4;
constexpr int kMaxItems = 8;
// The scalar path (odd widths, misaligned views) may hold twice as many: its items are single
// elements, so 16 of them cost fewer registers than 8 vectors, and widths up to 8192 fit.
constexpr int kMaxScalarItems = 16;
// 512, not 1024: a 1024-thread block caps ptxas at 64 registers, and the 8-vector bucket (its
// loads of x and residual hoisted for ILP) spills there; at 512 it has 128. Rows of up to
// 512 x 8 vectors (32768 bf16, 16384 fp32) stay in registers.
constexpr int kFwdMaxThreadsPerRow = 512;
// The backward holds x, dy and fp32 dw accumulators per item, so it wants one item per thread
// and many threads: with vectors, one 16-byte vector per thread on as many threads as the row
// has vectors (up to 1024: 8192 bf16, 4096 fp32), at most 64 registers, so that an SM holds 32
// warps: the shape of the Triton backward (16 warps x 8 values at width 4096, 64 registers, two
// programs per SM: 87% of copy bandwidth on an H100, benchmarks/NOTES.md). Wider rows take 8
// vectors on 256 threads (about 200 registers) and the scalar path stays at 256 threads.
constexpr int kBwdMaxThreadsPerRow = 1024;
constexpr int kBwdWideThreadsPerRow = 256;
// Bound on the fp32 dw partials, in floats per SM (64 KB). QuACK's k x #SM partial rows for
// width N (k = 16/8/4/2/1 for N <= 256/1K/2K/4K/8K) is this rule at 4096-8192 floats; twice
// that here because our backward keeps a thread's whole share in registers (one row in flight
// per block), so it needs more resident blocks to keep loads in flight (4 at width 4096: 512
// threads per SM). The extra partial traffic is 2 x 64 KB per SM, a few % at LLaMA sizes.
constexpr int64_t kPartialFloatsPerSm = 16384;
constexpr int kReduceRows = 8;           // dw reduction block: 32 columns x 8 partial lanes

// How a row kernel is launched. items == 0 selects the wide-row path (x read twice).
struct RowLaunch {
  int vec;              // elements per access: 16 B worth, or 1 on the scalar path
  int items;            // vectors each thread keeps in registers; 0 = wide path
  int threads_per_row;  // blockDim.x
  int rows_per_block;   // blockDim.y
  int64_t blocks;       // gridDim.x
};

// A RowLaunch of `items` per thread on `threads` per row: rows narrower than kMinBlockThreads
// share a block, so that an SM (at most 32 resident blocks) can still be filled.
constexpr RowLaunch row_block(int vec, int64_t items, int64_t threads) {
  const int64_t rows_per_block = threads >= kMinBlockThreads ? 1 : kMinBlockThreads / threads;
  return RowLaunch{vec, static_cast<int>(items), static_cast<int>(threads),
                   static_cast<int>(rows_per_block), 0};
}

// Threads per row and items per thread for a row of n_vec vectors: about kTargetItems vectors
// per thread, at least one warp (a narrow row is one warp: the reduction is shuffles only), at
// most max_threads; rows that would need more than kMaxItems per thread take the wide path.
// Items come in buckets 4, 8 (and 16 on the scalar path): rows under 128 vectors leave some
// items idle rather than get their own specializations (each costs build time, and such rows
// are latency-bound anyway).
constexpr RowLaunch row_shape(int64_t dim, int vec, int max_threads) {
  const int64_t n_vec = cdiv(dim, vec);
  int64_t threads = next_pow2(cdiv(n_vec, kTargetItems));
  threads = threads < kWarp ? kWarp : (threads > max_threads ? max_threads : threads);
  int64_t items = next_pow2(cdiv(n_vec, threads));
  items = items < kTargetItems ? kTargetItems : items;
  if (items > (vec == 1 ? kMaxScalarItems : kMaxItems)) items = 0;
  return row_block(vec, items, threads);
}

// 16-byte vectors when every row starts 16-byte aligned and the width is a whole number of
// vectors, else the scalar path.
constexpr int row_vec(int64_t dim, int elem_size, bool aligned) {
  return aligned && dim % (16 / elem_size) == 0 ? 16 / elem_size : 1;
}

// Forward: one block row (threadIdx.y) per row, one row per block row, no persistent loop (each
// row is independent and short, so the hardware scheduler balances best).
constexpr RowLaunch rms_norm_fwd_launch_settings(int64_t rows, int64_t dim, int elem_size,
                                                 bool aligned) {
  RowLaunch s = row_shape(dim, row_vec(dim, elem_size, aligned), kFwdMaxThreadsPerRow);
  s.blocks = cdiv(rows, s.rows_per_block);
  return s;
}

// The launch bounds of each backward specialization: one vector per thread (kVec > 1, kItems
// == 1) runs blocks of up to 1024 threads (64 registers: ptxas fits it without spilling,
// tests/test_cuda_build.py); every other bucket at most 256 threads.
constexpr bool rms_norm_bwd_narrow(int vec, int items) { return vec > 1 && items == 1; }
constexpr int rms_norm_bwd_max_threads(int vec, int items) {
  return rms_norm_bwd_narrow(vec, items) ? kBwdMaxThreadsPerRow : kBwdWideThreadsPerRow;
}

// Backward shape: one vector per thread on a multiple of 32 threads (a power of two below 128,
// with several rows per block) when the row has at most 1024 vectors; else the shared shape on
// up to 256 threads (8 vectors, the scalar buckets, the wide path).
constexpr RowLaunch rms_norm_bwd_shape(int64_t dim, int vec) {
  const int64_t n_vec = cdiv(dim, vec);
  if (vec > 1 && n_vec <= kBwdMaxThreadsPerRow) {
    int64_t threads = cdiv(n_vec, kWarp) * kWarp;
    if (threads < kMinBlockThreads) threads = next_pow2(threads);
    return row_block(vec, 1, threads);
  }
  return row_shape(dim, vec, kBwdWideThreadsPerRow);
}

// Backward: persistent blocks striding over rows, so that each (block, row slot) sums its share
// of dw in registers and writes one fp32 partial row. Grid: no more blocks than are resident at
// once (resident_blocks_per_sm(shape) is the kernel's occupancy, which its register use
// decides), so all run in one wave and share the rows evenly; and few enough slots that the
// partials stay within kPartialFloatsPerSm per SM (pure overhead traffic beyond that).
template <typename Occupancy>
constexpr RowLaunch rms_norm_bwd_launch_settings(int64_t rows, int64_t dim, int elem_size,
                                                 bool aligned, int num_sms,
                                                 Occupancy&& resident_blocks_per_sm) {
  RowLaunch s = rms_norm_bwd_shape(dim, row_vec(dim, elem_size, aligned));
  int64_t resident = resident_blocks_per_sm(s);
  resident = resident < 1 ? 1 : resident;
  int64_t per_sm = kPartialFloatsPerSm / (dim * s.rows_per_block);
  per_sm = per_sm < 1 ? 1 : (per_sm > resident ? resident : per_sm);
  const int64_t row_groups = cdiv(rows, s.rows_per_block);
  s.blocks = row_groups < per_sm * num_sms ? row_groups : per_sm * num_sms;
  return s;
}

// ------------------------------------------------------------------ compile-time self-test
// The settings functions are constexpr so their invariants are proven here, at build time (a
// broken heuristic fails the build), for the widths where buckets change and the LLaMA widths.
constexpr bool row_launch_ok(const RowLaunch& s, int64_t dim, int max_threads) {
  const bool items_ok = s.items == 0 || s.items == 4 || s.items == 8 ||
                        (s.items == 16 && s.vec == 1) ||
                        (s.items == 1 && s.vec > 1 && max_threads == kBwdMaxThreadsPerRow);
  const bool covers = s.items == 0 || int64_t{s.items} * s.threads_per_row * s.vec >= dim;
  return items_ok && covers && s.threads_per_row % kWarp == 0 &&
         s.threads_per_row <= max_threads && s.rows_per_block >= 1 &&
         s.rows_per_block <= kMaxRowsPerBlock &&
         s.threads_per_row * s.rows_per_block <=
             (max_threads > kMinBlockThreads ? max_threads : kMinBlockThreads) &&
         (s.vec == 1 || dim % s.vec == 0) && s.blocks >= 1;
}

constexpr bool rms_norm_settings_self_test() {
  for (int64_t dim : {1, 2, 3, 7, 8, 9, 31, 32, 33, 123, 127, 128, 129, 255, 256, 257, 511, 512,
                      513, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097, 5120, 6656, 8191,
                      8192, 8193, 11008, 16383, 16384, 16385, 32768, 32769, 65535, 65536, 65537}) {
    for (int elem_size : {2, 4}) {
      for (bool aligned : {false, true}) {
        for (int64_t rows : {int64_t{1}, int64_t{3}, int64_t{100000}}) {
          const RowLaunch f = rms_norm_fwd_launch_settings(rows, dim, elem_size, aligned);
          const RowLaunch b = rms_norm_bwd_launch_settings(
              rows, dim, elem_size, aligned, 132, [](const RowLaunch& shape) {
                return kMaxThreadsPerSm / (shape.threads_per_row * shape.rows_per_block);
              });
          if (!row_launch_ok(f, dim, kFwdMaxThreadsPerRow)) return false;
          if (!row_launch_ok(b, dim, kBwdMaxThreadsPerRow)) return false;
          // a block never exceeds the launch bounds of the kernel it runs
          if (b.threads_per_row * b.rows_per_block > rms_norm_bwd_max_threads(b.vec, b.items))
            return false;
          if (f.blocks * f.rows_per_block < rows) return false;
          if (b.blocks > cdiv(rows, b.rows_per_block)) return false;
          // Rows up to 8192 wide stay in registers (one read of x).
          if (dim <= 8192 && f.items == 0) return false;
        }
      }
    }
  }
  return true;
}
#ifndef __CUDA_ARCH__  // host passes only: the device passes would re-evaluate it per arch
static_assert(rms_norm_settings_self_test(), "rms_norm launch settings broke an invariant");
#endif
// LLaMA-7B width in bf16: 128 threads x 4 vectors of 8 (QuACK's 4096 config holds 2x as many).
static_assert(rms_norm_fwd_launch_settings(1, 4096, 2, true).threads_per_row == 128 &&
              rms_norm_fwd_launch_settings(1, 4096, 2, true).items == 4);
// Backward at the LLaMA widths: one vector per thread; 16384 bf16 is 256 threads x 8.
static_assert(rms_norm_bwd_shape(4096, 8).threads_per_row == 512 &&
              rms_norm_bwd_shape(4096, 8).items == 1);
static_assert(rms_norm_bwd_shape(6656, 8).threads_per_row == 832 &&
              rms_norm_bwd_shape(8192, 8).threads_per_row == 1024 &&
              rms_norm_bwd_shape(4096, 4).threads_per_row == 1024);
static_assert(rms_norm_bwd_shape(16384, 8).threads_per_row == 256 &&
              rms_norm_bwd_shape(16384, 8).items == 8);
static_assert(rms_norm_bwd_shape(256, 8).threads_per_row == 32 &&
              rms_norm_bwd_shape(256, 8).rows_per_block == 4);
// Odd width 123 takes the scalar path: one warp, 4 values per lane, 4 rows per block.
static_assert(rms_norm_fwd_launch_settings(1, 123, 2, true).vec == 1 &&
              rms_norm_fwd_launch_settings(1, 123, 2, true).threads_per_row == 32 &&
              rms_norm_fwd_launch_settings(1, 123, 2, true).rows_per_block == 4);
// fp32 at 65536 is wider than 512 threads x 8 vectors: the wide path.
static_assert(rms_norm_fwd_launch_settings(1, 65536, 4, true).items == 0);

// The inv_dim argument of both row kernels: 1 / dim, computed on the host because an IEEE
// division in the kernel compiles to a subroutine call whose calling convention spills
// registers (seen on sm_90 in ptxas -v).
inline float inv_dim(int64_t dim) {
  return static_cast<float>(1.0 / static_cast<double>(dim));
}

}  // namespace
}  // namespace llama_kernels
