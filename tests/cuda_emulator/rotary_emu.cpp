// extern "C" entry point running csrc/rotary_kernels.cuh on the host emulator, for rotary in
// tests/cuda_emulator/__init__.py, through the header's launch path (run_rotary), the code that
// csrc/rotary.cu runs. This file only fills the operand struct and reports the settings.
#include "rows_emu.h"
#include "rotary_kernels.cuh"

extern "C" {

// x (batch, seqlen, heads, head_dim) with strides (batch, seq, head) and unit stride along D;
// out contiguous; positions (batch, seqlen) int64 or nullptr. info: (vec, threads_per_token,
// tokens_per_block, blocks), all 0 when nothing was launched.
int rotary_emu(int dtype, void* out, const void* x, const float* cos, const float* sin,
               const int64_t* positions, int64_t batch, int64_t seqlen, int64_t heads,
               int64_t head_dim, int64_t table_rows, int64_t stride_x_batch,
               int64_t stride_x_seq, int64_t stride_x_head, int interleaved, int conjugate,
               int64_t* info, char* err, size_t err_len) {
  using namespace llama_kernels;
  return emu::call_c(err, err_len, [&] {
    const RotaryParams p{out, x, cos, sin, positions, batch, seqlen, heads, head_dim,
                         table_rows, stride_x_batch, stride_x_seq, stride_x_head,
                         interleaved != 0, conjugate != 0};
    rows_emu::with_float_dtype(dtype, [&](auto tag) {
      const RotaryLaunch s = run_rotary<decltype(tag)>(p, rows_emu::launch);
      info[0] = s.vec;
      info[1] = s.threads_per_token;
      info[2] = s.tokens_per_block;
      info[3] = s.blocks;
    });
  });
}

}  // extern "C"
