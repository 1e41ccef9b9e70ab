// SwiGLU, forward and backward (the math of reference.py):
//   forward   out = silu(g) * u = g * sigmoid(g) * u
//   backward  du = dout * g * sigmoid(g),  dg = dout * u * s * (1 + g * (1 - s)),  s = sigmoid(g)
// fp32 math, each output rounded once. Inputs are 2-D (rows, cols) views with unit column
// stride and any row stride (gate and up may be the two halves of one fused projection);
// outputs are contiguous.
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace llama_kernels {
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

// ------------------------------------------------------------------------------ host side

void check_operand(const at::Tensor& t, const at::Tensor& gate, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == gate.device(), name, ": expected device ", gate.device(),
              " (that of gate), got ", t.device());
  TORCH_CHECK(t.scalar_type() == gate.scalar_type(), name, ": expected dtype ",
              gate.scalar_type(), " (that of gate), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == gate.sizes(), name, ": expected shape ", gate.sizes(),
              " (that of gate), got ", t.sizes());
  TORCH_CHECK(t.stride(-1) == 1, name,
              ": expected unit stride in the last dimension, got strides ", t.strides());
}

void check_gate(const at::Tensor& gate) {
  LK_CHECK_CUDA(gate, "gate");
  LK_CHECK_DIM(gate, 2, "gate");
  LK_CHECK_FLOAT(gate, "gate");
  LK_CHECK_LAST_DIM_CONTIGUOUS(gate, "gate");
}

// Calls f(integral_constant<kVec>) for a vector width of 1 or 16 bytes.
template <typename T, typename F>
void with_vec(int vec, F&& f) {
  if (vec == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    TORCH_CHECK(vec == kVec16<T>, "swiglu: internal error, vector width ", vec);
    f(std::integral_constant<int, kVec16<T>>{});
  }
}

// Runs f(kernel, T{}) with kernel = kernel_of(T{}, integral_constant<kVec>{}) for the dtype T
// and the vector width: one place that maps run-time settings to a specialization, used both
// to query its occupancy and to launch it.
template <typename KernelOf, typename F>
void with_kernel(at::ScalarType dtype, int vec, const KernelOf& kernel_of, F&& f) {
  LK_DISPATCH_FLOAT(dtype, "swiglu", [&] {
    with_vec<scalar_t>(vec, [&](auto v) { f(kernel_of(scalar_t{}, v), scalar_t{}); });
  });
}

// The SM count and each specialization's occupancy come from common.cuh's caches: asked once
// per process, not per call (they would cost microseconds of host time per decode-sized op).
template <typename KernelOf>
ElementwiseLaunch pick_launch(const at::Tensor& gate, bool aligned, const KernelOf& kernel_of) {
  const int device = gate.get_device();
  return swiglu_launch_settings(
      gate.size(0), gate.size(1), gate.element_size(), aligned, num_sms(device), [&](int vec) {
        int resident = 0;
        with_kernel(gate.scalar_type(), vec, kernel_of, [&](auto kernel, auto) {
          resident = max_active_blocks_per_sm(kernel, kThreads, 0, device);
        });
        return resident;
      });
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up) {
  check_gate(gate);
  check_operand(up, gate, "up");
  const c10::cuda::CUDAGuard guard(gate.device());
  const int64_t rows = gate.size(0), cols = gate.size(1);
  at::Tensor out = at::empty({rows, cols}, gate.options());
  if (out.numel() == 0) return out;
  const bool aligned = rows_aligned16(gate) && rows_aligned16(up) && rows_aligned16(out);
  const auto kernel_of = [](auto t, auto vec) {
    return swiglu_fwd_kernel<decltype(t), decltype(vec)::value>;
  };
  const ElementwiseLaunch s = pick_launch(gate, aligned, kernel_of);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_kernel(gate.scalar_type(), s.vec, kernel_of, [&](auto kernel, auto tag) {
    using T = decltype(tag);
    kernel<<<static_cast<unsigned>(s.blocks), kThreads, 0, stream>>>(
        static_cast<T*>(out.data_ptr()), static_cast<const T*>(gate.data_ptr()),
        static_cast<const T*>(up.data_ptr()), rows, cols, gate.stride(0), up.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dout,
                                                   const at::Tensor& gate,
                                                   const at::Tensor& up) {
  check_gate(gate);
  check_operand(up, gate, "up");
  check_operand(dout, gate, "dout");
  const c10::cuda::CUDAGuard guard(gate.device());
  const int64_t rows = gate.size(0), cols = gate.size(1);
  at::Tensor dgate = at::empty({rows, cols}, gate.options());
  at::Tensor dup = at::empty({rows, cols}, gate.options());
  if (dgate.numel() == 0) return {dgate, dup};
  const bool aligned = rows_aligned16(dout) && rows_aligned16(gate) && rows_aligned16(up) &&
                       rows_aligned16(dgate) && rows_aligned16(dup);
  const auto kernel_of = [](auto t, auto vec) {
    return swiglu_bwd_kernel<decltype(t), decltype(vec)::value>;
  };
  const ElementwiseLaunch s = pick_launch(gate, aligned, kernel_of);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_kernel(gate.scalar_type(), s.vec, kernel_of, [&](auto kernel, auto tag) {
    using T = decltype(tag);
    kernel<<<static_cast<unsigned>(s.blocks), kThreads, 0, stream>>>(
        static_cast<T*>(dgate.data_ptr()), static_cast<T*>(dup.data_ptr()),
        static_cast<const T*>(dout.data_ptr()), static_cast<const T*>(gate.data_ptr()),
        static_cast<const T*>(up.data_ptr()), rows, cols, dout.stride(0), gate.stride(0),
        up.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dgate, dup};
}

}  // namespace
}  // namespace llama_kernels

TORCH_LIBRARY_IMPL(llama_kernels, CUDA, m) {
  m.impl("swiglu_fwd_cuda", &llama_kernels::swiglu_fwd_cuda);
  m.impl("swiglu_bwd_cuda", &llama_kernels::swiglu_bwd_cuda);
}
