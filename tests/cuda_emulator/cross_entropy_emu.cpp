// extern "C" entry point running csrc/cross_entropy_kernels.cuh on the host emulator, for
// cross_entropy_chunk in tests/cuda_emulator/__init__.py, through the header's launch path
// (run_cross_entropy_chunk), the code that csrc/cross_entropy.cu runs. This file only fills
// the operand struct and reports the settings.
#include "rows_emu.h"
#include "cross_entropy_kernels.cuh"

extern "C" {

// logits (rows, vocab) with row stride stride_row (elements), unit stride along vocab, in/out;
// target int64 (rows,); loss fp32 (rows,); scale fp32, row i's at scale[i * stride_scale].
// info: (vec, threads, blocks), all 0 when nothing was launched.
int cross_entropy_chunk_emu(int dtype, void* logits, const int64_t* target, float* loss,
                            const float* scale, int64_t rows, int64_t vocab, int64_t stride_row,
                            int64_t stride_scale, int64_t ignore_index, int write_grad,
                            int64_t* info, char* err, size_t err_len) {
  using namespace llama_kernels;
  return emu::call_c(err, err_len, [&] {
    const CrossEntropyChunkParams p{logits, target, loss, scale, rows, vocab, stride_row,
                                    stride_scale, ignore_index, write_grad != 0};
    rows_emu::with_float_dtype(dtype, [&](auto tag) {
      const CrossEntropyLaunch s = run_cross_entropy_chunk<decltype(tag)>(p, rows_emu::launch);
      info[0] = s.vec;
      info[1] = s.threads;
      info[2] = s.blocks;
    });
  });
}

}  // extern "C"
