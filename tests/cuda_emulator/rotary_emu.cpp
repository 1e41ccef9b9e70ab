// extern "C" entry point running csrc/rotary_kernels.cuh on the host emulator, for rotary in
// tests/cuda_emulator/__init__.py. Same launch path as csrc/rotary.cu: its alignment test,
// rotary_launch_settings, the same specializations.
#include "rows_emu.h"
#include "rotary_kernels.cuh"

#include <type_traits>

extern "C" {

// x (batch, seqlen, heads, head_dim) with strides (batch, seq, head) and unit stride along D;
// out contiguous; positions (batch, seqlen) int64 or nullptr. info: (vec, threads_per_token,
// tokens_per_block, blocks).
int rotary_emu(int dtype, void* out, const void* x, const float* cos, const float* sin,
               const int64_t* positions, int64_t batch, int64_t seqlen, int64_t heads,
               int64_t head_dim, int64_t table_rows, int64_t stride_x_batch,
               int64_t stride_x_seq, int64_t stride_x_head, int interleaved, int conjugate,
               int64_t* info, char* err, size_t err_len) {
  using namespace llama_kernels;
  return emu::call_c(err, err_len, [&] {
    const int64_t tokens = batch * seqlen;
    if (tokens * heads * head_dim == 0) return;
    rows_emu::with_float_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      const int es = sizeof(T);
      const int64_t vec16 = 16 / es;
      const bool aligned = is_aligned(x, 16) &&
                           (batch == 1 || stride_x_batch % vec16 == 0) &&
                           (seqlen == 1 || stride_x_seq % vec16 == 0) &&
                           (heads == 1 || stride_x_head % vec16 == 0) &&
                           is_aligned(out, 16);
      const RotaryLaunch s = rotary_launch_settings(tokens, heads, head_dim, es, aligned);
      info[0] = s.vec;
      info[1] = s.threads_per_token;
      info[2] = s.tokens_per_block;
      info[3] = s.blocks;
      auto launch = [&](auto vec, auto interleaved_tag) {
        emu::launch(rotary_kernel<T, decltype(vec)::value, decltype(interleaved_tag)::value>,
                    dim3(s.blocks), dim3(s.threads_per_token, s.tokens_per_block), 0,
                    static_cast<T*>(out), static_cast<const T*>(x), cos, sin, positions, tokens,
                    seqlen, static_cast<int>(heads), static_cast<int>(head_dim), table_rows,
                    stride_x_batch, stride_x_seq, stride_x_head, conjugate != 0);
      };
      with_vec<T>(s.vec, [&](auto vec) {
        if (interleaved) {
          launch(vec, std::true_type{});
        } else {
          launch(vec, std::false_type{});
        }
      });
    });
  });
}

}  // extern "C"
