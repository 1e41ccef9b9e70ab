// Small kernels written against llama_kernels::tc, run by tests/test_cuda_emulator.py to prove
// that the emulator follows the PTX semantics documented in csrc/tensor_core.cuh (fragment
// layouts, ldmatrix addressing, cp.async groups) and that it reports the bugs it promises to.
// Every entry point returns 0, or nonzero with the error message in `err`.
#include "emulator.h"

namespace tc = llama_kernels::tc;

namespace {

// ---------------------------------------------------------------- GEMM through the pipeline
// C (16x16 fp32) += A (16x32, row-major) @ B (32x16), B given either as Bt[n][k] (read with
// ldmatrix_x4, as K in attention) or as B[k][n] (ldmatrix_x4_trans, as V). Two warps: warp w
// computes columns 8w..8w+7. Rows k >= k_valid of B are zero-filled by cp.async (!pred).
struct GemmParams {
  const uint16_t* a;
  const uint16_t* b;
  float* c;
  int b_kn;     // 0: Bt[n][k], 1: B[k][n]
  int mode;     // 0: correct; 1: reads B before waiting for it; 2: never waits for B
  int k_valid;  // multiple of 8
};

template <typename T>
void gemm_kernel(const GemmParams p) {
  uint16_t* a_s = reinterpret_cast<uint16_t*>(tc::dynamic_smem());  // [16][32]
  uint16_t* b_s = a_s + 16 * 32;                                      // [16][32] or [32][16]
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;

  // 64 threads, 64 chunks of 16 bytes per operand: thread t copies chunk t of each.
  tc::cp_async_16(a_s + t * 8, p.a + t * 8, true);
  tc::cp_async_commit();
  const int k_of_chunk = p.b_kn ? t / 2 : (t % 4) * 8;
  const bool pred = k_of_chunk < p.k_valid;
  tc::cp_async_16(b_s + t * 8, pred ? p.b + t * 8 : nullptr, pred);
  tc::cp_async_commit();

  tc::cp_async_wait<1>();  // A has landed, B may not have
  tc::block_sync();
  if (p.mode == 0) {
    tc::cp_async_wait<0>();
    tc::block_sync();
  }

  // A, k-step s: matrix i is A[8(i%2) .. +8][16s + 8(i/2) .. +8] -> a0..a3.
  uint32_t a[2][4];
  for (int s = 0; s < 2; ++s) {
    const int i = lane / 8, r = lane % 8;
    tc::ldmatrix_x4(a[s], a_s + (8 * (i % 2) + r) * 32 + 16 * s + 8 * (i / 2));
  }
  // B for columns 8w..8w+7: matrix i covers k = 8i..8i+7, so r[2s], r[2s+1] = b0, b1 of step s.
  uint32_t b[4];
  {
    const int i = lane / 8, r = lane % 8;
    if (p.b_kn) {
      tc::ldmatrix_x4_trans(b, b_s + (8 * i + r) * 16 + 8 * warp);
    } else {
      tc::ldmatrix_x4(b, b_s + (8 * warp + r) * 32 + 8 * i);
    }
  }

  const int g = lane / 4, c = lane % 4, col = 8 * warp + 2 * c;
  float d[4] = {p.c[g * 16 + col], p.c[g * 16 + col + 1], p.c[(g + 8) * 16 + col],
                p.c[(g + 8) * 16 + col + 1]};
  for (int s = 0; s < 2; ++s) {
    const uint32_t bs[2] = {b[2 * s], b[2 * s + 1]};
    tc::mma_16816<T>(d, a[s], bs);
  }
  if (p.mode == 1) tc::cp_async_wait<0>();
  p.c[g * 16 + col] = d[0];
  p.c[g * 16 + col + 1] = d[1];
  p.c[(g + 8) * 16 + col] = d[2];
  p.c[(g + 8) * 16 + col + 1] = d[3];
}

// ---------------------------------------------------------------- accumulator -> A fragment
// O (16x16) = round16(A @ Bt^T) @ V: the flash-attention chain. S's accumulator layout, packed
// with pack2, must be exactly the A-fragment layout of the second mma. One warp, plain loads.
struct ChainParams {
  const uint16_t* a;   // [16][16]
  const uint16_t* bt;  // [16][16]: [n][k]
  const uint16_t* v;   // [16][16]: [k][n]
  float* o;            // [16][16]
};

template <typename T>
void chain_kernel(const ChainParams p) {
  uint16_t* a_s = reinterpret_cast<uint16_t*>(tc::dynamic_smem());
  uint16_t* bt_s = a_s + 256;
  uint16_t* v_s = bt_s + 256;
  const int lane = threadIdx.x, i = lane / 8, r = lane % 8, g = lane / 4, c = lane % 4;
  for (int e = lane; e < 256; e += 32) {
    a_s[e] = p.a[e];
    bt_s[e] = p.bt[e];
    v_s[e] = p.v[e];
  }
  tc::block_sync();
  uint32_t a[4], bt[4], v[4];
  tc::ldmatrix_x4(a, a_s + (8 * (i % 2) + r) * 16 + 8 * (i / 2));
  tc::ldmatrix_x4(bt, bt_s + (8 * (i / 2) + r) * 16 + 8 * (i % 2));  // n-tile i/2, k-half i%2
  tc::ldmatrix_x4_trans(v, v_s + (8 * (i % 2) + r) * 16 + 8 * (i / 2));
  float s[2][4] = {};
  for (int j = 0; j < 2; ++j) {
    const uint32_t b[2] = {bt[2 * j], bt[2 * j + 1]};
    tc::mma_16816<T>(s[j], a, b);
  }
  const uint32_t pa[4] = {tc::pack2<T>(s[0][0], s[0][1]), tc::pack2<T>(s[0][2], s[0][3]),
                          tc::pack2<T>(s[1][0], s[1][1]), tc::pack2<T>(s[1][2], s[1][3])};
  for (int j = 0; j < 2; ++j) {
    float o[4] = {};
    const uint32_t b[2] = {v[2 * j], v[2 * j + 1]};
    tc::mma_16816<T>(o, pa, b);
    for (int q = 0; q < 4; ++q) p.o[(g + 8 * (q / 2)) * 16 + 8 * j + 2 * c + q % 2] = o[q];
  }
}

// ---------------------------------------------------------------- shuffles
struct ShflParams {
  const float* in;
  float* out_xor;  // in[t ^ mask]
  float* out_sum;  // butterfly sum over the warp
  int mask;
};

void shfl_kernel(const ShflParams p) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  p.out_xor[t] = tc::shfl_xor(p.in[t], p.mask);
  float v = p.in[t];
  for (int m = 16; m >= 1; m /= 2) v += tc::shfl_xor(v, m);
  p.out_sum[t] = v;
}

// ---------------------------------------------------------------- buffer reuse
// Loads tile 0 into a buffer, then issues tile 1 into the same buffer and reads it twice:
// before waiting (must see the issue-time poison, not tile 0) and after: out[0..2][32][4].
// Two blocks; each first reads the buffer untouched: out[3 + block][32][4] (0xFF bytes, not
// the previous block's data).
struct ReuseParams {
  const uint16_t* src;  // two tiles of 256 values
  uint32_t* out;
};

void reuse_kernel(const ReuseParams p) {
  char* smem = tc::dynamic_smem();
  const int lane = threadIdx.x;
  tc::ldmatrix_x4(*reinterpret_cast<uint32_t(*)[4]>(p.out + 128 * (3 + blockIdx.x) + 4 * lane),
                  smem + 16 * lane);
  for (int tile = 0; tile < 2; ++tile) {
    tc::cp_async_16(smem + 16 * lane, p.src + 256 * tile + 8 * lane, true);
    tc::cp_async_commit();
    if (tile == 1) tc::ldmatrix_x4(*reinterpret_cast<uint32_t(*)[4]>(p.out + 128 + 4 * lane),
                                   smem + 16 * lane);
    tc::cp_async_wait<0>();
    tc::block_sync();
    tc::ldmatrix_x4(*reinterpret_cast<uint32_t(*)[4]>(p.out + 256 * tile + 4 * lane),
                    smem + 16 * lane);
    tc::block_sync();
  }
}

// ---------------------------------------------------------------- schedules
// A two-warp pipeline over `tiles` tiles of [64][8] 16-bit values in one shared buffer: thread
// t copies row t, and each warp reads (ldmatrix_x4) the 32 rows the *other* warp copies,
// out[tile][warp][32][4]. With barrier = 1 a block_sync separates the reads of a tile from the
// copies of the next into the same buffer; with barrier = 0 it is missing, an inter-warp race
// that round-robin hides (each warp reads a tile in the same round as the other, before
// either issues the next) but a schedule that runs one warp ahead exposes: the other warp
// reads rows the first has already re-issued (poison) or even landed (the next tile).
struct RaceParams {
  const uint16_t* src;  // tiles x 64 x 8 values
  uint32_t* out;
  int tiles;
  int barrier;
};

void race_kernel(const RaceParams p) {
  char* buf = tc::dynamic_smem();  // [64][16 bytes]
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  tc::cp_async_16(buf + 16 * t, p.src + 8 * t, true);
  tc::cp_async_commit();
  for (int tile = 0; tile < p.tiles; ++tile) {
    tc::cp_async_wait<0>();
    tc::block_sync();  // this tile has landed
    uint32_t r[4];
    tc::ldmatrix_x4(r, buf + 16 * (32 * (1 - warp) + lane));
    if (p.barrier) tc::block_sync();  // every warp is done reading this tile
    if (tile + 1 < p.tiles) tc::cp_async_16(buf + 16 * t, p.src + 512 * (tile + 1) + 8 * t, true);
    tc::cp_async_commit();
    // Work on the tile (while the next one is in flight): a few collectives.
    float x = float(lane);
    for (int m = 1; m < 32; m *= 2) x += tc::shfl_xor(x, m);
    for (int i = 0; i < 4; ++i) p.out[((tile * 2 + warp) * 32 + lane) * 4 + i] = r[i];
  }
}

// The order in which warps pass `steps` collectives: lane 0 of warp w takes the next value of
// a block-wide counter after each, order[w][step]. Round-robin gives lockstep; a random
// schedule its own, reproducible order per seed.
struct OrderParams {
  int* order;
  int* counter;
  int steps;
};

void order_kernel(const OrderParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int step = 0; step < p.steps; ++step) {
    tc::shfl_xor(float(step), 1);
    if (lane == 0) p.order[warp * p.steps + step] = (*p.counter)++;
  }
}

// ---------------------------------------------------------------- broken kernels
int g_deadlock_finished = 0;  // threads of deadlock_kernel's control that ran to the end

void deadlock_kernel(const int variant) {
  const int t = threadIdx.x, lane = t % 32;
  uint32_t r[4];
  switch (variant) {
    case 0:  // warp 1 exits, warp 0 waits for it at the block barrier
      if (t >= 32) return;
      tc::block_sync();
      break;
    case 1:  // lane 0 at the block barrier, the rest of its warp at a shuffle
      if (t == 0) {
        tc::block_sync();
      } else if (t < 32) {
        tc::shfl_xor(1.0f, 1);
      } else {
        tc::block_sync();
      }
      break;
    case 2:  // half a warp exits before a shuffle
      if (lane >= 16) return;
      tc::shfl_xor(1.0f, 1);
      break;
    case 3:  // lanes of one warp in different collectives
      if (lane < 16) {
        tc::shfl_xor(1.0f, 1);
      } else {
        tc::ldmatrix_x4(r, tc::dynamic_smem());
      }
      break;
    default:  // control: work that differs between warps (not within one) is fine
      for (int i = 0; i < 3 + t / 32; ++i) tc::shfl_xor(float(i), 3);
      tc::block_sync();
      if (t >= 32) tc::shfl_xor(1.0f, 1);
      tc::block_sync();
      ++g_deadlock_finished;  // fibers run one at a time: no race
  }
}

alignas(16) uint16_t g_fault_src[256];

void fault_kernel(const int which) {
  char* smem = tc::dynamic_smem();  // 512 bytes
  const int lane = threadIdx.x;
  uint32_t r[4];
  alignas(16) uint16_t unregistered[8] = {};
  switch (which) {
    case 1:  // row 31 at offset 496 + 16 = 512: past the end
      tc::ldmatrix_x4(r, smem + 16 * (lane + 1));
      break;
    case 2:
      tc::ldmatrix_x4(r, smem + 16 * lane + 8);
      break;
    case 3:
      tc::cp_async_16(smem + 16 * lane + 4, g_fault_src + 8 * lane, true);
      break;
    case 4:
      tc::cp_async_16(smem + 16 * lane, unregistered, true);
      break;
    case 5:
      tc::cp_async_16(smem + 16 * lane, g_fault_src + 8 * lane + 1, true);
      break;
    case 8:  // copies issued but never committed: wait_group does not cover them
      tc::cp_async_16(smem + 16 * lane, g_fault_src + 8 * lane, true);
      tc::cp_async_wait<0>();
      break;
    default:  // control: in-bounds, aligned, waited
      tc::cp_async_16(smem + 16 * lane, g_fault_src + 8 * lane, true);
      tc::cp_async_commit();
      tc::cp_async_wait<0>();
      tc::block_sync();
      tc::ldmatrix_x4(r, smem + 16 * lane);
      // Matrix 0 is rows 0..7 (lanes 0..7); lane 4g+c holds its row g, cols 2c and 2c+1.
      if (r[0] != (g_fault_src[8 * (lane / 4) + 2 * (lane % 4)] |
                   uint32_t(g_fault_src[8 * (lane / 4) + 2 * (lane % 4) + 1]) << 16))
        emu::detail::fail("control: ldmatrix returned the wrong data");
  }
}

}  // namespace

extern "C" {

// Conversions: to_bits = 1: float -> 16-bit patterns; 0: patterns -> float.
int emu_convert(int dtype, int to_bits, const void* in, void* out, int64_t n, char* err,
                size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    emu::with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      for (int64_t i = 0; i < n; ++i) {
        if (to_bits) {
          const T h = static_cast<const float*>(in)[i];
          static_cast<uint16_t*>(out)[i] = h.x;
        } else {
          T h;
          h.x = static_cast<const uint16_t*>(in)[i];
          static_cast<float*>(out)[i] = float(h);
        }
      }
    });
  });
}

// out[0] = pack2<T>(lo, hi); out[1], out[2] = unpack2<T>(out[0]) as float bits.
int emu_pack2(int dtype, float lo, float hi, uint32_t* out, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    emu::with_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      out[0] = tc::pack2<T>(lo, hi);
      const float2 f = tc::unpack2<T>(out[0]);
      out[1] = __float_as_uint(f.x);
      out[2] = __float_as_uint(f.y);
    });
  });
}

int selftest_gemm(int dtype, int b_kn, int mode, int k_valid, const uint16_t* a,
                  const uint16_t* b, float* c, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    emu::register_global(a, 16 * 32 * 2);
    emu::register_global(b, 16 * 32 * 2);
    const GemmParams p{a, b, c, b_kn, mode, k_valid};
    emu::with_dtype(dtype, [&](auto tag) {
      emu::launch(gemm_kernel<decltype(tag)>, dim3(1), dim3(64), 2048, p);
    });
  });
}

int selftest_chain(int dtype, const uint16_t* a, const uint16_t* bt, const uint16_t* v, float* o,
                   char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    const ChainParams p{a, bt, v, o};
    emu::with_dtype(dtype, [&](auto tag) {
      emu::launch(chain_kernel<decltype(tag)>, dim3(1), dim3(32), 3 * 512, p);
    });
  });
}

// `blocks` blocks of `threads` threads; in/out hold blocks * threads floats.
int selftest_shfl(const float* in, float* out_xor, float* out_sum, int blocks, int threads,
                  int mask, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    const ShflParams p{in, out_xor, out_sum, mask};
    emu::launch(shfl_kernel, dim3(blocks), dim3(threads), 0, p);
  });
}

int selftest_reuse(const uint16_t* src, uint32_t* out, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    emu::register_global(src, 512 * 2);
    emu::launch(reuse_kernel, dim3(2), dim3(32), 512, ReuseParams{src, out});
  });
}

// src: tiles x 512 values; out: tiles x 2 x 32 x 4 words.
int selftest_race(const uint16_t* src, uint32_t* out, int tiles, int barrier, char* err,
                  size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    emu::register_global(src, size_t(tiles) * 512 * 2);
    emu::launch(race_kernel, dim3(1), dim3(64), 1024, RaceParams{src, out, tiles, barrier});
  });
}

// One block of `warps` warps; order holds warps x steps ints.
int selftest_order(int* order, int warps, int steps, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    int counter = 0;
    emu::launch(order_kernel, dim3(1), dim3(32 * warps), 0, OrderParams{order, &counter, steps});
  });
}

// finished: the threads of the control (variant 4) that got past both barriers.
int selftest_deadlock(int variant, int* finished, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    g_deadlock_finished = 0;
    emu::launch(deadlock_kernel, dim3(2), dim3(64), 64, variant);
    *finished = g_deadlock_finished;
  });
}

// which: 0 control; 1-5, 8 bad addresses / copies (see fault_kernel); 6 too much shared
// memory; 7 too many threads.
int selftest_fault(int which, char* err, size_t err_len) {
  return emu::call_c(err, err_len, [&] {
    for (int i = 0; i < 256; ++i) g_fault_src[i] = static_cast<uint16_t>(i * 7 + 1);
    emu::register_global(g_fault_src, sizeof g_fault_src);
    const size_t smem = which == 6 ? (227 << 10) + 16 : 512;
    emu::launch(fault_kernel, dim3(1), dim3(which == 7 ? 1056 : 32), smem, which);
  });
}

}  // extern "C"
