// SwiGLU, forward and backward (the math of reference.py):
//   forward   out = silu(g) * u = g * sigmoid(g) * u
//   backward  du = dout * g * sigmoid(g),  dg = dout * u * s * (1 + g * (1 - s)),  s = sigmoid(g)
// fp32 math, each output rounded once. Inputs are 2-D (rows, cols) views with unit column
// stride and any row stride (gate and up may be the two halves of one fused projection);
// outputs are contiguous.
// Kernels, launch settings and the launch path (run_swiglu_fwd, run_swiglu_bwd), torch-free:
// swiglu.cu adds the torch side and CUDA launches; tests/cuda_emulator/swiglu_emu.cpp compiles
// the same code with g++ against tests/cuda_emulator/emulator.h.
#pragma once

#include "device_common.cuh"

namespace llama_kernels {
// Internal linkage: each translation unit that includes this header (swiglu.cu, the emulator's
// swiglu_emu.cpp) gets its own kernels, and the constants below may share names with those of
// the other kernel headers.
namespace {

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

// ------------------------------------------------------------------------------ launch path
// Operands: pointers to elements of the run's T, row strides in elements; launch and occupancy:
// see device_common.cuh. Outputs are contiguous (row stride cols).
struct SwigluFwdParams {  // in aggregate-initialization order
  void* out;
  const void* gate;
  const void* up;
  int64_t rows, cols, stride_gate_row, stride_up_row;
};
struct SwigluBwdParams {  // in aggregate-initialization order
  void* dgate;
  void* dup;
  const void* dout;
  const void* gate;
  const void* up;
  int64_t rows, cols, stride_dout_row, stride_gate_row, stride_up_row;
};

// The launch shared by the forward and the backward, T the dtype: nothing when empty (returns
// blocks 0); else swiglu_launch_settings, 16-byte vectors when every row of every operand is
// 16-byte aligned, each candidate width's occupancy that of its kernel_of(integral_constant
// <vec>); then that kernel on args. Returns the settings it launched.
template <typename T, typename KernelOf, typename Occupancy, typename Launch, typename... Args>
ElementwiseLaunch launch_swiglu(int64_t rows, int64_t cols,
                                std::initializer_list<RowsOperand> operands, int num_sms,
                                Occupancy& occupancy, Launch& launch, const KernelOf& kernel_of,
                                const Args&... args) {
  if (rows * cols == 0) return ElementwiseLaunch{};
  const bool aligned = rows_aligned16(operands, rows, sizeof(T));
  const ElementwiseLaunch s =
      swiglu_launch_settings(rows, cols, sizeof(T), aligned, num_sms, [&](int vec) {
        int resident = 0;
        with_vec<T>(vec, [&](auto v) { resident = occupancy(kernel_of(v), kThreads, size_t{0}); });
        return resident;
      });
  with_vec<T>(s.vec, [&](auto v) {
    launch(kernel_of(v), dim3(static_cast<unsigned>(s.blocks)), dim3(kThreads), size_t{0},
           args...);
  });
  return s;
}

// out for p on num_sms SMs; returns the settings it launched (blocks 0: empty, no launch).
template <typename T, typename Occupancy, typename Launch>
ElementwiseLaunch run_swiglu_fwd(const SwigluFwdParams& p, int num_sms, Occupancy&& occupancy,
                                 Launch&& launch) {
  return launch_swiglu<T>(
      p.rows, p.cols, {{p.gate, p.stride_gate_row}, {p.up, p.stride_up_row}, {p.out, p.cols}},
      num_sms, occupancy, launch,
      [](auto vec) { return swiglu_fwd_kernel<T, decltype(vec)::value>; }, static_cast<T*>(p.out),
      static_cast<const T*>(p.gate), static_cast<const T*>(p.up), p.rows, p.cols,
      p.stride_gate_row, p.stride_up_row);
}

// dgate and dup for p, as run_swiglu_fwd.
template <typename T, typename Occupancy, typename Launch>
ElementwiseLaunch run_swiglu_bwd(const SwigluBwdParams& p, int num_sms, Occupancy&& occupancy,
                                 Launch&& launch) {
  return launch_swiglu<T>(
      p.rows, p.cols,
      {{p.dout, p.stride_dout_row}, {p.gate, p.stride_gate_row}, {p.up, p.stride_up_row},
       {p.dgate, p.cols}, {p.dup, p.cols}},
      num_sms, occupancy, launch,
      [](auto vec) { return swiglu_bwd_kernel<T, decltype(vec)::value>; },
      static_cast<T*>(p.dgate), static_cast<T*>(p.dup), static_cast<const T*>(p.dout),
      static_cast<const T*>(p.gate), static_cast<const T*>(p.up), p.rows, p.cols,
      p.stride_dout_row, p.stride_gate_row, p.stride_up_row);
}

}  // namespace
}  // namespace llama_kernels
