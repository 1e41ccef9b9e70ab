// SwiGLU, forward and backward (the math of reference.py):
//   forward   out = silu(g) * u = g * sigmoid(g) * u
//   backward  du = dout * g * sigmoid(g),  dg = dout * u * s * (1 + g * (1 - s)),  s = sigmoid(g)
// fp32 math, each output rounded once. Inputs are 2-D (rows, cols) views with unit column
// stride and any row stride (gate and up may be the two halves of one fused projection);
// outputs are contiguous.
// Kernels and launch settings; the host side (checks, allocation, launch) is swiglu.cu.
// Torch-free: also compiled by g++ against tests/cuda_emulator/emulator.h.
#pragma once

#include "device_common.cuh"

namespace llama_kernels {
// Internal linkage, as before the kernels moved here from swiglu.cu: the header is
// included by that one .cu (and by the emulator's swiglu_emu.cpp), and the kernels keep
// their names.
namespace {

// Kernels declare __launch_bounds__(max threads, 1): without the ", 1" ptxas spilled a register
// or two (STACK:8) to reach a higher occupancy tier, seen on sm_80 and sm_90 with nvcc 13.0;
// tests/test_cuda_build.py asserts STACK:0 for every kernel.
constexpr int kThreads = 256;

struct ElementwiseLaunch {
  int vec;         // elements per access: 16 B worth, or 1 on the scalar path
  int64_t blocks;  // gridDim.x; blockDim.x = kThreads
};

// Memory-bound elementwise op: 16-byte accesses when every row of every operand starts 16-byte
// aligned and cols is a whole number of vectors (else scalar); 256 threads per block; a grid of
// exactly one wave of resident blocks (resident_blocks_per_sm(vec) is the kernel's occupancy,
// which its register use decides) striding over the work: every block runs from the start, so
// no tail of a half-empty last wave, and few block launches.
template <typename Occupancy>
constexpr ElementwiseLaunch swiglu_launch_settings(int64_t rows, int64_t cols, int elem_size,
                                                   bool aligned, int num_sms,
                                                   Occupancy&& resident_blocks_per_sm) {
  const int vec = aligned && cols % (16 / elem_size) == 0 ? 16 / elem_size : 1;
  const int64_t work = cdiv(rows * (cols / vec), kThreads);
  int64_t resident = resident_blocks_per_sm(vec);
  resident = resident < 1 ? 1 : resident;
  const int64_t wave = num_sms * resident;
  return ElementwiseLaunch{vec, work < wave ? (work < 1 ? 1 : work) : wave};
}
constexpr int full_occupancy(int) { return kMaxThreadsPerSm / kThreads; }
static_assert(swiglu_launch_settings(8192, 11008, 2, true, 132, full_occupancy).vec == 8 &&
              swiglu_launch_settings(8192, 11008, 2, true, 132, full_occupancy).blocks == 132 * 8);
static_assert(swiglu_launch_settings(3, 123, 2, true, 132, full_occupancy).vec == 1 &&
              swiglu_launch_settings(3, 123, 2, true, 132, full_occupancy).blocks == 2);

// sigmoid(g) = 1 / (1 + exp(-g)), the formula PyTorch's CUDA sigmoid evaluates. No NaN for
// large |g|: exp overflows to inf and 1 / inf = 0; exp underflows to 0 and the result is 1.
__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// Where a thread's grid-stride walk over the vectors of a (rows, cols) grid of kVec-wide
// vectors stands: vector i = row * vecs_per_row + col / kVec, for i = start, start + step, ...
// The walk visits the same vectors in the same order as dividing each i by vecs_per_row, but
// divides only twice per thread (start and step, each split into rows and columns once) and
// then advances by additions: a 64-bit division is a long software sequence per element.
struct GridStrideWalk {
  int64_t row, col;             // current element: col is the first of the vector's kVec
  int64_t step_rows, step_col;  // step = step_rows * vecs_per_row + step_col / kVec
  int64_t row_elems;            // vecs_per_row * kVec, the column at which a row wraps

  __device__ __forceinline__ GridStrideWalk(int64_t start, int64_t step, int64_t vecs_per_row,
                                            int kVec)
      : row(start / vecs_per_row),
        col((start - row * vecs_per_row) * kVec),
        step_rows(step / vecs_per_row),
        step_col((step - step_rows * vecs_per_row) * kVec),
        row_elems(vecs_per_row * kVec) {}

  // step_col < row_elems and col < row_elems, so one wrap at most.
  __device__ __forceinline__ void advance() {
    row += step_rows;
    col += step_col;
    if (col >= row_elems) {
      col -= row_elems;
      ++row;
    }
  }
};

// out = g * sigmoid(g) * u (left to right, as reference.py), rounded once.
// Grid-stride over the rows * cols / kVec vectors (GridStrideWalk); 64-bit indices throughout.
// Preconditions: kVec > 1 only when cols % kVec == 0 and every pointer and row stride is
// 16-byte aligned; out contiguous and not overlapping the inputs.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, 1) swiglu_fwd_kernel(
    T* __restrict__ out_ptr, const T* __restrict__ gate_ptr, const T* __restrict__ up_ptr,
    int64_t rows, int64_t cols,
    int64_t stride_gate_row, int64_t stride_up_row) {
  for (GridStrideWalk w(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                        static_cast<int64_t>(gridDim.x) * blockDim.x, cols / kVec, kVec);
       w.row < rows; w.advance()) {
    const int64_t row = w.row, col = w.col;
    float g[kVec], u[kVec], out[kVec];
    vec_to_floats(load_vec<T, kVec>(gate_ptr + row * stride_gate_row + col), g);
    vec_to_floats(load_vec<T, kVec>(up_ptr + row * stride_up_row + col), u);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = __fmul_rn(__fmul_rn(g[j], sigmoid(g[j])), u[j]);
    store_vec<T, kVec>(out_ptr + row * cols + col, floats_to_vec<T, kVec>(out));
  }
}

// dup = dout * g * s, dgate = dout * u * s * (1 + g * (1 - s)), s = sigmoid(g) (left to right,
// as reference.py), each rounded once. Same layout and preconditions as swiglu_fwd_kernel;
// dgate and dup contiguous.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, 1) swiglu_bwd_kernel(
    T* __restrict__ dgate_ptr, T* __restrict__ dup_ptr, const T* __restrict__ dout_ptr,
    const T* __restrict__ gate_ptr, const T* __restrict__ up_ptr,
    int64_t rows, int64_t cols,
    int64_t stride_dout_row, int64_t stride_gate_row, int64_t stride_up_row) {
  for (GridStrideWalk w(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                        static_cast<int64_t>(gridDim.x) * blockDim.x, cols / kVec, kVec);
       w.row < rows; w.advance()) {
    const int64_t row = w.row, col = w.col;
    float d[kVec], g[kVec], u[kVec], dg[kVec], du[kVec];
    vec_to_floats(load_vec<T, kVec>(dout_ptr + row * stride_dout_row + col), d);
    vec_to_floats(load_vec<T, kVec>(gate_ptr + row * stride_gate_row + col), g);
    vec_to_floats(load_vec<T, kVec>(up_ptr + row * stride_up_row + col), u);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float s = sigmoid(g[j]);
      du[j] = __fmul_rn(__fmul_rn(d[j], g[j]), s);
      const float slope = __fadd_rn(1.f, __fmul_rn(g[j], __fsub_rn(1.f, s)));
      dg[j] = __fmul_rn(__fmul_rn(__fmul_rn(d[j], u[j]), s), slope);
    }
    store_vec<T, kVec>(dgate_ptr + row * cols + col, floats_to_vec<T, kVec>(dg));
    store_vec<T, kVec>(dup_ptr + row * cols + col, floats_to_vec<T, kVec>(du));
  }
}

}  // namespace
}  // namespace llama_kernels
