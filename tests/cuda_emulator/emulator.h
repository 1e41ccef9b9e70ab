// Host emulation of the CUDA subset the attention and row kernels are written in, so that g++
// can compile csrc/flash_attention_kernels.cuh and the row kernels (csrc/swiglu_kernels.cuh,
// rms_norm_kernels.cuh, rotary_kernels.cuh) unchanged and run them on the CPU.
//
// What it is for: checking fragment layouts, swizzles, masks and pipeline order without a GPU.
// The kernels reach the hardware only through llama_kernels::tc (csrc/tensor_core.cuh), so
// emulating those dozen functions with their PTX semantics is enough. Each CUDA thread is a
// fiber (ucontext) on one OS thread; a thread runs until it waits at a barrier (a warp
// collective or block_sync). Two schedules, both deterministic (set_schedule_seed):
//   - seed 0 (the default): round-robin over the threads, so the warps of a block advance in
//     lockstep, one collective at a time;
//   - seed != 0: a reproducible pseudo-random schedule. The scheduler stays on one warp for a
//     burst of a random length (1 to 16384 resumptions, about log-uniform: from fine
//     interleaving to one warp running hundreds of collectives ahead of the others, up to its
//     next block_sync; a collective takes two resumptions per lane), resuming a random
//     runnable lane of it each time, then picks a random warp for the next burst; a thread may
//     also be preempted at cp.async issue and wait. Barriers stay exact: a thread waiting at
//     one is not runnable until it is released. Races between warps that lockstep happens to
//     order right (a missing block_sync before overwriting a tile another warp still reads)
//     show through the poison below under some seeds.
// Bugs that would be silent or flaky on a GPU are made loud:
//   - shared memory starts as 0xFF bytes (NaN in fp16 and bf16), and cp.async poisons its
//     destination when issued and copies only at cp_async_wait, so reading a tile before
//     waiting for it (or a missing sync before overwriting one) shows up as NaN;
//   - ldmatrix / cp.async addresses are bounds- and alignment-checked against the block's
//     shared memory and the registered global allocations (register_global);
//   - deadlocks (barriers some threads never reach), warp collectives called divergently,
//     threads that exit with cp.async copies in flight, and over-limit launches throw
//     std::runtime_error, to be caught at the extern "C" boundary.
//   - load_vec / store_vec (csrc/device_common.cuh) check that an access is aligned to its
//     size and lies inside one registered global range; CUDA_KERNEL_ASSERT throws.
// Static __shared__ arrays (the row kernels' reduction scratch and rotary's table rows):
// `#define __shared__ static` gives a kernel specialization one copy of each, which is one copy
// per block because blocks run one after another, never concurrently. They are not poisoned
// per block (they keep the previous block's values), unlike the dynamic shared memory above.
// Not emulated: timing, atomics, bank conflicts, the memory model (threads switch only at
// collectives, barriers and, with a seed, cp.async: a race between plain loads and stores with
// none of those in between shows only as wrong values, not as poison).
#pragma once

#define LLAMA_KERNELS_EMULATOR 1

#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// ------------------------------------------------------------------ CUDA language surface

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One copy per kernel specialization = one per block, as blocks never run concurrently (top of
// this file). Only for arrays declared inside kernels: `extern __shared__` is not supported.
#define __shared__ static
// __restrict__ is a g++ keyword already; `#pragma unroll` is ignored (-Wno-unknown-pragmas).

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// The launch coordinates of the running thread; the scheduler sets them on every resume.
inline dim3 threadIdx(0, 0, 0), blockIdx(0, 0, 0), blockDim, gridDim;
constexpr int warpSize = 32;

// CUDA's global integer min/max (device code calls them unqualified).
template <typename A, typename B>
inline auto min(A a, B b) -> decltype(a < b ? a : b) { return b < a ? b : a; }
template <typename A, typename B>
inline auto max(A a, B b) -> decltype(a < b ? a : b) { return a < b ? b : a; }

// The fast-math intrinsics, at full precision (the emulator checks layouts, not ulps).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
// Round-to-nearest products and sums: what plain float operations are on the host (g++ does
// not contract them into FMAs without -mfma).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

// ------------------------------------------------------------------ 16-bit floats

namespace emu {

// float -> fp16 bits, round to nearest even (as __float2half_rn), NaN -> canonical 0x7fff.
inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds (ties to even) to inf
  if (ax >= 0x38800000u) {                       // normal in fp16: rebias, drop 13 bits
    uint32_t h = (ax - 0x38000000u) >> 13;
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may reach the exponent
    return static_cast<uint16_t>(sign | h);
  }
  // Subnormal in fp16: value = m * 2^(e-150); in units of 2^-24 that is m >> (126 - e).
  const uint32_t e = ax >> 23, shift = 126 - e;
  if (shift > 24) return static_cast<uint16_t>(sign);  // below 2^-25: rounds to zero
  const uint32_t m = (ax & 0x7fffffu) | (e ? 0x800000u : 0u);
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;  // may become 0x400, the smallest normal
  return static_cast<uint16_t>(sign | q);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu,
                 m = h & 0x3ffu;
  if (e == 0x1f) return __uint_as_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float v = ldexpf(static_cast<float>(m), -24);  // exact: m < 2^10
    return sign ? -v : v;
  }
  return __uint_as_float(sign | ((e + 112) << 23) | (m << 13));
}

// float -> bf16 bits, round to nearest even (as __float2bfloat16_rn), NaN -> 0x7fff.
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = __float_as_uint(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t h) {
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
}

}  // namespace emu

// Trivially copyable, 2 bytes, convertible to and from float like CUDA's own types.
struct __half {
  uint16_t x;
  __half() = default;
  __half(float f) : x(emu::float_to_half_bits(f)) {}
  operator float() const { return emu::half_bits_to_float(x); }
};
struct __nv_bfloat16 {
  uint16_t x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : x(emu::float_to_bf16_bits(f)) {}
  operator float() const { return emu::bf16_bits_to_float(x); }
};
static_assert(sizeof(__half) == 2 && std::is_trivially_copyable<__half>::value, "");
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivially_copyable<__nv_bfloat16>::value, "");
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }

// The two-lane types and their conversions (cuda_fp16.h / cuda_bf16.h): .x is the low half.
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float2 __half22float2(__half2 p) { return {float(p.x), float(p.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 p) { return {float(p.x), float(p.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__nv_bfloat16(a), __nv_bfloat16(b)};
}

// ------------------------------------------------------------------ fiber scheduler

namespace emu {

inline void register_global(const void* ptr, size_t bytes);
inline void clear_globals();

namespace detail {

constexpr size_t kStackBytes = 256 << 10;
// The opt-in maximum of dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
// of a compute capability, 0 for one the table lacks. sm_86 / sm_89 / sm_120 run the sm_80
// build with 99 KiB, the A100 (8.0) allows 163 KiB, sm_90 / sm_100 227 KiB.
constexpr size_t max_smem_optin(int major, int minor) {
  const int cc = major * 10 + minor;
  switch (cc) {
    case 70: case 72: return 96 << 10;
    case 75: return 64 << 10;
    case 80: case 87: return 163 << 10;
    case 86: case 89: case 120: case 121: return 99 << 10;
    case 90: case 100: case 103: return 227 << 10;
    default: return 0;
  }
}
constexpr int kMaxThreads = 1024;

struct PendingCopy {
  void* dst;
  const void* src;
  bool pred;
  int group;
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // kStackBytes plus a PROT_NONE guard page below: overflow faults
  dim3 tid;
  int warp = 0, lane = 0;
  bool done = false;
  const uint64_t* wait_gen = nullptr;  // waiting until *wait_gen != wait_seen
  uint64_t wait_seen = 0;
  const char* wait_what = "";
  std::vector<PendingCopy> pending;  // issued cp.async copies not yet performed
  int open_group = 0;                // group id of copies issued now (= groups committed)
};

// Per-warp exchange area of the collectives: lanes post inputs, the last lane to arrive
// computes every lane's result (so the warp's operation is atomic w.r.t. other warps).
struct Warp {
  int lanes = 0, arrived = 0;
  uint64_t gen = 0;
  const char* op = nullptr;
  uint32_t a[32][4], b[32][2], r[32][4];
  float d[32][4], v[32];
  const void* row[32];
  int mask[32];
};

struct State {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<std::pair<const char*, const char*>> globals;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  char* smem = nullptr;
  size_t smem_bytes = 0;
  int block_arrived = 0;
  uint64_t block_gen = 0;
  std::string error;
  uint64_t schedule_seed = 0;  // 0: round-robin; otherwise the seed of the random schedule
  uint64_t rng = 0;            // splitmix64 state, reset to the seed at every launch
  int cc_major = 9, cc_minor = 0;  // the emulated device's compute capability
};
inline State g;

// splitmix64 (Steele, Lea, Flood 2014): any state, including small seeds, gives a good stream.
inline uint64_t next_random() {
  uint64_t z = (g.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

[[noreturn]] inline void fail(const std::string& what) {
  const Fiber* f = g.current;
  std::string where = "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
                      "," + std::to_string(blockIdx.z) + ")";
  if (f) where += " thread " + std::to_string(f->warp * 32 + f->lane);
  throw std::runtime_error(where + ": " + what);
}

inline std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

inline void check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  const char* c = static_cast<const char*>(p);
  if (c < g.smem || c + bytes > g.smem + g.smem_bytes)
    fail(std::string(what) + ": address " + hex(p) + " is outside shared memory (" +
         std::to_string(g.smem_bytes) + " bytes; offset " + std::to_string(c - g.smem) + ")");
  if ((c - g.smem) % align)
    fail(std::string(what) + ": shared address offset " + std::to_string(c - g.smem) +
         " is not " + std::to_string(align) + "-byte aligned");
}

inline void check_global(const void* p, size_t bytes, const char* what) {
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(p) % 16) fail(std::string(what) + ": source " + hex(p) +
                                                " is not 16-byte aligned");
  for (const auto& r : g.globals)
    if (c >= r.first && c + bytes <= r.second) return;
  fail(std::string(what) + ": source " + hex(p) + " is outside every registered global range");
}

// Switch back to the scheduler; it resumes this fiber once its wait (if any) is satisfied.
inline void yield() { swapcontext(&g.current->ctx, &g.scheduler); }

// Under a random schedule, give the scheduler a chance (1 in 4) to run another thread here:
// a point between barriers where the order of threads matters (cp.async issue and wait).
inline void maybe_preempt() {
  if (g.schedule_seed != 0 && next_random() % 4 == 0) yield();
}

inline void wait_for(const uint64_t* gen, const char* what) {
  Fiber& f = *g.current;
  f.wait_gen = gen;
  f.wait_seen = *gen;
  f.wait_what = what;
  while (*gen == f.wait_seen) yield();
  f.wait_gen = nullptr;
}

// All lanes of this warp meet here; the last to arrive runs complete(warp).
template <typename Complete>
inline void warp_barrier(const char* op, Complete&& complete) {
  Warp& w = g.warps[g.current->warp];
  if (w.arrived == 0) {
    w.op = op;
  } else if (std::strcmp(w.op, op) != 0) {
    fail(std::string("warp divergence: lanes of warp ") + std::to_string(g.current->warp) +
         " call different collectives (" + w.op + " and " + op + ")");
  }
  if (++w.arrived == w.lanes) {
    complete(w);
    w.arrived = 0;
    ++w.gen;
    return;
  }
  wait_for(&w.gen, op);
}

// A warp collective: post this lane's inputs, barrier (last lane computes), read this lane's
// result, barrier again so that no lane posts its next inputs while others still read.
template <typename Post, typename Complete, typename Read>
inline void warp_collective(const char* op, Post&& post, Complete&& complete, Read&& read) {
  Warp& w = g.warps[g.current->warp];
  post(w, g.current->lane);
  warp_barrier(op, complete);
  read(w, g.current->lane);
  warp_barrier(op, [](Warp&) {});
}

// mma and ldmatrix exchange data between all 32 lanes: a partial warp is undefined behaviour.
inline void require_full_warp(const Warp& w, const char* op) {
  if (w.lanes != 32)
    fail(std::string(op) + ": called by a warp of " + std::to_string(w.lanes) + " lanes");
}

inline void fiber_entry() {
  Fiber& f = *g.current;
  try {
    (*g.body)();
    if (!f.pending.empty())
      fail("exited with " + std::to_string(f.pending.size()) +
           " cp.async copies never waited for (missing cp_async_wait)");
  } catch (const std::exception& e) {
    if (g.error.empty()) g.error = e.what();
  }
  f.done = true;  // returning switches to uc_link, the scheduler
}

inline bool runnable(const Fiber& f) {
  return !f.done && !(f.wait_gen && *f.wait_gen == f.wait_seen);
}

// A uniformly random runnable lane of warp w, or null if none is.
inline Fiber* random_runnable_lane(int w) {
  Fiber* candidates[32];
  int n = 0;
  for (int l = 0; l < g.warps[w].lanes; ++l)
    if (runnable(g.fibers[32 * w + l])) candidates[n++] = &g.fibers[32 * w + l];
  return n ? candidates[next_random() % n] : nullptr;
}

// A uniformly random warp with a runnable lane, or -1 if none has one (a deadlock).
inline int random_runnable_warp() {
  int candidates[kMaxThreads / 32], n = 0;
  for (size_t w = 0; w < g.warps.size(); ++w) {
    for (int l = 0; l < g.warps[w].lanes; ++l) {
      if (runnable(g.fibers[32 * w + l])) {
        candidates[n++] = static_cast<int>(w);
        break;
      }
    }
  }
  return n ? candidates[next_random() % n] : -1;
}

inline std::string deadlock_report() {
  int exited = 0, at_block = 0, at_warp = 0;
  std::string ops;
  for (const Fiber& f : g.fibers) {
    if (f.done) { ++exited; continue; }
    if (f.wait_gen == &g.block_gen) { ++at_block; continue; }
    ++at_warp;
    if (ops.find(f.wait_what) == std::string::npos)
      ops += std::string(ops.empty() ? "" : ", ") + f.wait_what;
  }
  return "deadlock: " + std::to_string(at_block) + " thread(s) wait at block_sync, " +
         std::to_string(at_warp) + " at a warp collective (" + ops + "), " +
         std::to_string(exited) + " exited";
}

inline void run_block(size_t nthreads) {
  g.block_arrived = 0;
  std::memset(g.smem, 0xFF, g.smem_bytes);  // NaN in fp16 and bf16: unwritten reads show
  for (size_t w = 0; w < g.warps.size(); ++w) {
    g.warps[w] = Warp();
    g.warps[w].lanes = static_cast<int>(std::min<size_t>(32, nthreads - 32 * w));
  }
  for (size_t i = 0; i < nthreads; ++i) {
    Fiber& f = g.fibers[i];
    f.done = false;
    f.wait_gen = nullptr;
    f.pending.clear();
    f.open_group = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  size_t live = nthreads;
  auto resume = [&live](Fiber& f) {
    threadIdx = f.tid;
    g.current = &f;
    swapcontext(&g.scheduler, &f.ctx);
    g.current = nullptr;
    if (!g.error.empty()) throw std::runtime_error(g.error);
    if (f.done) --live;
  };
  if (g.schedule_seed == 0) {
    while (live > 0) {
      bool progressed = false;
      for (Fiber& f : g.fibers) {
        if (!runnable(f)) continue;
        resume(f);
        progressed = true;
      }
      if (!progressed) throw std::runtime_error(deadlock_report());
    }
    return;
  }
  int warp = -1;
  uint64_t burst = 0;  // resumptions left on `warp` before the next random pick of a warp
  while (live > 0) {
    Fiber* f = burst > 0 ? random_runnable_lane(warp) : nullptr;
    if (!f) {
      warp = random_runnable_warp();
      if (warp < 0) throw std::runtime_error(deadlock_report());
      // Uniform in [1, 2^e], e uniform in 0..14: short bursts (fine interleaving) as often as
      // long ones (one warp through hundreds of collectives while the others stand still).
      burst = 1 + next_random() % (uint64_t(1) << (next_random() % 15));
      f = random_runnable_lane(warp);
    }
    --burst;
    resume(*f);
  }
}

inline void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const size_t nthreads = size_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > kMaxThreads || block.z > 64)
    throw std::runtime_error("launch: block of " + std::to_string(nthreads) +
                             " threads (limit 1024, z <= 64)");
  const size_t smem_limit = max_smem_optin(g.cc_major, g.cc_minor);
  if (smem_bytes > smem_limit)
    throw std::runtime_error("launch: " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory per block, over the " +
                             std::to_string(smem_limit) + "-byte opt-in limit of compute "
                             "capability " + std::to_string(g.cc_major) + "." +
                             std::to_string(g.cc_minor));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("launch: grid (" + std::to_string(grid.x) + "," +
                             std::to_string(grid.y) + "," + std::to_string(grid.z) +
                             ") is empty or over 65535 in y or z");
  const size_t page = 4096, map_bytes = kStackBytes + page;
  std::vector<char> smem(smem_bytes + 128);
  g.smem = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128);
  g.smem_bytes = smem_bytes;
  g.fibers.assign(nthreads, Fiber());
  g.warps.assign((nthreads + 31) / 32, Warp());
  g.body = &body;
  g.error.clear();
  g.rng = g.schedule_seed;  // each launch replays the seed's schedule from its start
  struct Cleanup {  // stacks and state go even when a block throws
    ~Cleanup() {
      for (Fiber& f : g.fibers)
        if (f.stack) munmap(f.stack - 4096, kStackBytes + 4096);
      g.fibers.clear();
      g.smem = nullptr;
      g.smem_bytes = 0;
      g.current = nullptr;
    }
  } cleanup;
  for (size_t i = 0; i < nthreads; ++i) {
    Fiber& f = g.fibers[i];
    void* m = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("launch: cannot map a fiber stack");
    mprotect(m, page, PROT_NONE);
    f.stack = static_cast<char*>(m) + page;
    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (size_t(block.x) * block.y));
    f.warp = static_cast<int>(i / 32);
    f.lane = static_cast<int>(i % 32);
  }
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        run_block(nthreads);
      }
}

}  // namespace detail

inline void register_global(const void* ptr, size_t bytes) {
  const char* c = static_cast<const char*>(ptr);
  detail::g.globals.emplace_back(c, c + bytes);
}
inline void clear_globals() { detail::g.globals.clear(); }

// A plain global load or store of `bytes` bytes (a 16-byte vector or one element): aligned to
// its size, as the hardware requires, and inside one registered range (an out-of-bounds read
// is silent on a GPU, and a write may land in another allocation).
inline void check_global_access(const void* p, size_t bytes, const char* what) {
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(p) % bytes)
    detail::fail(std::string(what) + ": address " + detail::hex(p) + " is not " +
                 std::to_string(bytes) + "-byte aligned");
  for (const auto& r : detail::g.globals)
    if (c >= r.first && c + bytes <= r.second) return;
  detail::fail(std::string(what) + ": " + std::to_string(bytes) + " bytes at " + detail::hex(p) +
               " are outside every registered global range");
}

// 0 (the default): round-robin; any other value: the random schedule it seeds (see the top of
// this file). Applies to the launches that follow, until set again.
inline void set_schedule_seed(uint64_t seed) { detail::g.schedule_seed = seed; }
inline uint64_t schedule_seed() { return detail::g.schedule_seed; }

// The emulated device (default 9.0): its compute capability selects the shared-memory limit of
// the launches that follow (max_smem_optin), until set again. One the table lacks is refused.
inline void set_compute_capability(int major, int minor) {
  if (detail::max_smem_optin(major, minor) == 0)
    throw std::invalid_argument("compute capability " + std::to_string(major) + "." +
                                std::to_string(minor) + ": no shared-memory limit known");
  detail::g.cc_major = major;
  detail::g.cc_minor = minor;
}
// The opt-in limit of dynamic shared memory per block of the emulated device, in bytes.
inline size_t max_smem_per_block() {
  return detail::max_smem_optin(detail::g.cc_major, detail::g.cc_minor);
}

// kernel(args...) on every thread of every block; blocks run one after another.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, const Args&... args) {
  const std::function<void()> body = [&] { kernel(args...); };
  detail::run_grid(grid, block, smem_bytes, body);
}

// The extern "C" boundary: runs fn(), returns 0, or 1 with the error message in err. The
// registered global ranges are dropped either way (they belong to one call).
template <typename Fn>
int call_c(char* err, size_t err_len, Fn&& fn) {
  int rc = 0;
  try {
    fn();
  } catch (const std::exception& e) {
    const uint64_t seed = schedule_seed();
    if (err && err_len) {
      if (seed) {
        std::snprintf(err, err_len, "%s [schedule seed %llu]", e.what(),
                      static_cast<unsigned long long>(seed));
      } else {
        std::snprintf(err, err_len, "%s", e.what());
      }
    }
    rc = 1;
  }
  clear_globals();
  return rc;
}

// fn(T{}) with T the 16-bit type of `dtype`: 0 = __half, 1 = __nv_bfloat16.
template <typename Fn>
void with_dtype(int dtype, Fn&& fn) {
  if (dtype == 0) {
    fn(__half());
  } else if (dtype == 1) {
    fn(__nv_bfloat16());
  } else {
    throw std::runtime_error("dtype code " + std::to_string(dtype) + " (0 fp16, 1 bf16)");
  }
}

}  // namespace emu

// Every library built on this header exports the seed's setter (the Python wrapper sets it
// around each call); `used` emits the inline definition even where nothing calls it.
extern "C" __attribute__((used)) inline void emu_set_schedule_seed(uint64_t seed) {
  emu::set_schedule_seed(seed);
}
// The same for the emulated compute capability: 0 if set, 1 if the table lacks it.
extern "C" __attribute__((used)) inline int emu_set_compute_capability(int major, int minor) {
  if (emu::detail::max_smem_optin(major, minor) == 0) return 1;
  emu::set_compute_capability(major, minor);
  return 0;
}

// ------------------------------------------------------------------ tc:: primitives

namespace llama_kernels {
namespace tc {

namespace emu_detail {
template <typename T> float to_f(uint16_t h);
template <> inline float to_f<__half>(uint16_t h) { return emu::half_bits_to_float(h); }
template <> inline float to_f<__nv_bfloat16>(uint16_t h) { return emu::bf16_bits_to_float(h); }
template <typename T> uint16_t from_f(float f);
template <> inline uint16_t from_f<__half>(float f) { return emu::float_to_half_bits(f); }
template <> inline uint16_t from_f<__nv_bfloat16>(float f) { return emu::float_to_bf16_bits(f); }

// Element k of a register pair: k = 0 the low half.
template <typename T>
inline float elem(uint32_t r, int k) { return to_f<T>(static_cast<uint16_t>(r >> (16 * k))); }

// mma.m16n8k16.row.col, fp32 accumulate. Products of 16-bit values are exact in fp32; the sum
// is formed in double and rounded once (hardware order and rounding are unspecified).
template <typename T>
inline void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using emu::detail::Warp;
  emu::detail::warp_collective(
      "mma_16816",
      [&](Warp& w, int l) {
        emu::detail::require_full_warp(w, "mma_16816");
        std::memcpy(w.a[l], a, sizeof a);
        std::memcpy(w.b[l], b, sizeof b);
        std::memcpy(w.d[l], d, sizeof d);
      },
      [](Warp& w) {
        float A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; ++l) {  // lane = 4 * g + c
          const int g = l / 4, c = l % 4;
          for (int k = 0; k < 2; ++k) {
            A[g][2 * c + k] = elem<T>(w.a[l][0], k);
            A[g + 8][2 * c + k] = elem<T>(w.a[l][1], k);
            A[g][8 + 2 * c + k] = elem<T>(w.a[l][2], k);
            A[g + 8][8 + 2 * c + k] = elem<T>(w.a[l][3], k);
            B[2 * c + k][g] = elem<T>(w.b[l][0], k);
            B[8 + 2 * c + k][g] = elem<T>(w.b[l][1], k);
            C[g][2 * c + k] = w.d[l][k];
            C[g + 8][2 * c + k] = w.d[l][2 + k];
          }
        }
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, c = l % 4;
          for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i / 2), col = 2 * c + i % 2;
            double acc = C[row][col];
            for (int k = 0; k < 16; ++k) acc += double(A[row][k]) * double(B[k][col]);
            w.d[l][i] = static_cast<float>(acc);
          }
        }
      },
      [&](Warp& w, int l) { std::memcpy(d, w.d[l], sizeof d); });
}

// ldmatrix .x4: lanes 8i..8i+7 address the rows of matrix i; lane 4g+c receives row g cols
// 2c, 2c+1 of each matrix (trans: rows 2c, 2c+1 of column g), the first element low.
inline void ldmatrix(uint32_t (&r)[4], const void* row, bool trans, const char* op) {
  using emu::detail::Warp;
  emu::detail::check_smem(row, 16, 16, op);
  emu::detail::warp_collective(
      op,
      [&](Warp& w, int l) {
        emu::detail::require_full_warp(w, op);
        w.row[l] = row;
      },
      [trans](Warp& w) {
        uint16_t m[4][8][8];
        for (int l = 0; l < 32; ++l) std::memcpy(m[l / 8][l % 8], w.row[l], 16);
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, c = l % 4;
          for (int i = 0; i < 4; ++i) {
            const uint16_t lo = trans ? m[i][2 * c][g] : m[i][g][2 * c];
            const uint16_t hi = trans ? m[i][2 * c + 1][g] : m[i][g][2 * c + 1];
            w.r[l][i] = lo | (static_cast<uint32_t>(hi) << 16);
          }
        }
      },
      [&](Warp& w, int l) { std::memcpy(r, w.r[l], sizeof r); });
}
}  // namespace emu_detail

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return emu_detail::from_f<T>(lo) | (static_cast<uint32_t>(emu_detail::from_f<T>(hi)) << 16);
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v) {
  return {emu_detail::elem<T>(v, 0), emu_detail::elem<T>(v, 1)};
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "mma_16816: T is __half or __nv_bfloat16");
  emu_detail::mma<T>(d, a, b);
}

// The shared window address: the offset into the block's shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  emu::detail::check_smem(p, 1, 1, "smem_addr");
  return static_cast<uint32_t>(static_cast<const char*>(p) - emu::detail::g.smem);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  emu_detail::ldmatrix(r, row, false, "ldmatrix_x4");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  emu_detail::ldmatrix(r, row, true, "ldmatrix_x4_trans");
}
// The shared-window-address forms (what smem_addr returns: an offset into the block's memory).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t row) {
  emu_detail::ldmatrix(r, emu::detail::g.smem + row, false, "ldmatrix_x4");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t row) {
  emu_detail::ldmatrix(r, emu::detail::g.smem + row, true, "ldmatrix_x4_trans");
}

// Issue: poison the destination now, copy (or zero-fill when !pred) only at cp_async_wait.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool pred) {
  emu::detail::check_smem(dst, 16, 16, "cp_async_16 destination");
  if (pred) emu::detail::check_global(src, 16, "cp_async_16");
  std::memset(dst, 0xFF, 16);
  emu::detail::Fiber& f = *emu::detail::g.current;
  f.pending.push_back({dst, src, pred, f.open_group});
  emu::detail::maybe_preempt();  // others may run while the destination holds the poison
}
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  cp_async_16(emu::detail::g.smem + dst, src, pred);
}
__device__ __forceinline__ void cp_async_commit() { ++emu::detail::g.current->open_group; }
// Performs, in issue order, the copies of every committed group but the N most recent.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  emu::detail::maybe_preempt();  // others may run before this thread's copies land
  emu::detail::Fiber& f = *emu::detail::g.current;
  std::vector<emu::detail::PendingCopy> still;
  for (const auto& c : f.pending) {
    if (c.group >= f.open_group - N) {
      still.push_back(c);
    } else if (c.pred) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
  }
  f.pending.swap(still);
}

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  using emu::detail::Warp;
  if (lane_mask < 0 || lane_mask > 31) emu::detail::fail("shfl_xor: lane mask out of 0..31");
  emu::detail::warp_collective(
      "shfl_xor",
      [&](Warp& w, int l) {
        w.v[l] = v;
        w.mask[l] = lane_mask;
      },
      [](Warp& w) {
        float out[32];
        for (int l = 0; l < w.lanes; ++l) {
          const int src = l ^ w.mask[l];
          out[l] = src < w.lanes ? w.v[src] : w.v[l];
        }
        std::memcpy(w.v, out, sizeof out);
      },
      [&](Warp& w, int l) { v = w.v[l]; });
  return v;
}

__device__ __forceinline__ void block_sync() {
  using emu::detail::g;
  if (++g.block_arrived == static_cast<int>(g.fibers.size())) {
    g.block_arrived = 0;
    ++g.block_gen;
    return;
  }
  emu::detail::wait_for(&g.block_gen, "block_sync");
}

// Filled with 0xFF at the start of every block.
__device__ __forceinline__ char* dynamic_smem() { return emu::detail::g.smem; }

}  // namespace tc
}  // namespace llama_kernels

// ------------------------------------------------------------------ CUDA intrinsics of the row kernels
//
// The row kernels (csrc/*_kernels.cuh, csrc/device_common.cuh) use CUDA's own names, not tc::.

// Every lane named in `mask` must take part: the row kernels pass the full mask from full warps.
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  const int lanes = emu::detail::g.warps[emu::detail::g.current->warp].lanes;
  const unsigned all = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  if (mask != all) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "__shfl_xor_sync: mask 0x%08x is not the warp's %d lanes",
                  mask, lanes);
    emu::detail::fail(buf);
  }
  return llama_kernels::tc::shfl_xor(v, lane_mask);
}

inline void __syncthreads() { llama_kernels::tc::block_sync(); }

#define CUDA_KERNEL_ASSERT(cond)                                            \
  do {                                                                      \
    if (!(cond)) emu::detail::fail("CUDA_KERNEL_ASSERT failed: " #cond);    \
  } while (0)
