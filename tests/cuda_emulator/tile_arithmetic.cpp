// The tile arithmetic of csrc/flash_attention_common.cuh and the tiles the launch header
// csrc/flash_attention_kernels.cuh picks per head dim, exported for tests/test_cuda_attention.py
// to compare with a brute-force walk over every (query, key) pair. These are the very functions
// the kernels call.
#include "emulator.h"
#include "flash_attention_kernels.cuh"

namespace fa = llama_kernels::attention;

extern "C" {
int lk_visible(int i, int j, int sq, int sk, int causal) {
  return fa::visible(i, j, sq, sk, causal != 0);
}
int lk_key_block_end(int m_block, int block_m, int block_n, int sq, int sk, int causal) {
  return fa::key_block_end(m_block, block_m, block_n, sq, sk, causal != 0);
}
int lk_query_block_begin(int n_block, int block_m, int block_n, int sq, int sk, int causal) {
  return fa::query_block_begin(n_block, block_m, block_n, sq, sk, causal != 0);
}
int lk_tile_needs_mask(int m_block, int n_block, int block_m, int block_n, int sq, int sk,
                       int causal) {
  return fa::tile_needs_mask(m_block, n_block, block_m, block_n, sq, sk, causal != 0);
}
int lk_swizzle(int d, int row, int col) {
  return d == 64 ? fa::swizzle<64>(row, col) : fa::swizzle<128>(row, col);
}
// The tiles of each launch configuration: {D, forward BLOCK_M, BLOCK_N, threads, shared
// bytes; dK/dV keys, query step, threads, shared bytes; dQ queries, key step, threads, shared
// bytes}.
void lk_tiles(int d, int* out) {
  fa::with_head_dim(d, [&](auto config) {
    using C = decltype(config);
    const int v[13] = {C::Fwd::D,          C::Fwd::BLOCK_M,     C::Fwd::BLOCK_N,
                       C::Fwd::THREADS,    C::Fwd::SMEM_BYTES,  C::Dkdv::BLOCK_OWN,
                       C::Dkdv::BLOCK_STEP, C::Dkdv::THREADS,   C::Dkdv::SMEM_BYTES,
                       C::Dq::BLOCK_OWN,   C::Dq::BLOCK_STEP,   C::Dq::THREADS,
                       C::Dq::SMEM_BYTES};
    for (int i = 0; i < 13; ++i) out[i] = v[i];
  });
}
}
