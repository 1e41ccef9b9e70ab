// The few warp-level primitives the attention kernels are written in: tensor-core MMA
// (mma.sync m16n8k16, fp32 accumulators), ldmatrix, cp.async and a shuffle, each a thin
// wrapper over one PTX instruction (sm_80 and later).
//
// The kernels reach the hardware only through these functions, so tests can compile the
// same kernel source on the host against an emulation of exactly this interface
// (tests/cuda_emulator/emulator.h) and check the fragment, swizzle and mask arithmetic
// without a GPU. Keep the two in step: a function added here needs its emulated twin there.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 * g + c:
//   A 16x16 (row-major), 4 regs of two 16-bit values: a0 (row g, cols 2c..2c+1),
//     a1 (row g+8, same cols), a2 (row g, cols 8+2c..), a3 (row g+8, cols 8+2c..).
//   B 16x8 ("col"), 2 regs: b0 (rows 2c..2c+1, col g), b1 (rows 8+2c.., col g).
//   C/D 16x8 fp32, 4 floats: d0,d1 (row g, cols 2c, 2c+1), d2,d3 (row g+8, same cols).
// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i (16 bytes per row);
//   afterwards r[i] holds, in lane 4g+c, row g cols 2c..2c+1 of matrix i (.trans: the
//   transposed matrix, i.e. rows 2c..2c+1 of column g).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace llama_kernels {
namespace tc {

// Two floats as one register of two 16-bit values, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// d += a * b for one 16x8x16 tile, 16-bit inputs, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices from shared memory; `row` is this lane's row address, as a shared
// window address (smem_addr) or a pointer. Kernels keep 32-bit shared addresses: a 64-bit
// generic pointer per hoisted ldmatrix address costs two registers and a conversion.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  ldmatrix_x4(r, smem_addr(row));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  ldmatrix_x4_trans(r, smem_addr(row));
}

// 16 bytes global -> shared without a register round trip (L2 only: .cg); when !pred the
// destination is zero-filled and the source is not read. `dst` as for ldmatrix.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool pred) {
  cp_async_16(smem_addr(dst), src, pred);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed groups of this thread are still in flight. The rule of the
// kernels: shared memory written by cp.async is read (ldmatrix or plain loads) only after this
// wait and a block_sync; the "memory" clobber keeps the compiler from hoisting plain loads above.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

__device__ __forceinline__ void block_sync() { __syncthreads(); }

// The dynamic shared memory of the launch (its size is given at launch).
__device__ __forceinline__ char* dynamic_smem() {
  extern __shared__ __align__(128) char smem_[];
  return smem_;
}

}  // namespace tc
}  // namespace llama_kernels
