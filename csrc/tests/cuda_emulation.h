// A small CUDA emulation for running csrc/cuda/*.cu on the host (test-only; see
// csrc/tests/test_cuda_emulated.cpp). The .cu compiles as plain C++ against these definitions:
// the headers it names (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h, mma.h, cuda_runtime_api.h)
// resolve to the forwarding files in csrc/tests/cuda_emulation/, and its launches and dynamic
// shared memory go through MK_LAUNCH / MK_DYNAMIC_SMEM / MK_DYNAMIC_SMEM_ALIGNED, defined here.
//
// Execution model: a launch runs its blocks one after another; the threads of a block are fibers
// (ucontext) of the calling OS thread, switched only at barriers (__syncthreads, __syncwarp,
// the warp shuffles). Between two barriers each thread runs alone, so a kernel that reads what
// another thread writes without a barrier in between sees an order-dependent value: the fibers run
// in a fresh random order (seeded, set_schedule_seed) at every scheduling round and whole warps
// are held back at random for rounds, so such a race shows up as a wrong result. (Removing any one
// __syncthreads/__syncwarp of fast_weight_unroll.cu makes test_cuda_emulated fail, except seven
// that are redundant in the current code: each guards data that only the same thread touches next,
// or that another barrier already separates.) `__shared__` is `static` (one copy per kernel instantiation, correct
// because blocks do not overlap); dynamic shared memory and cudaMallocAsync memory start NaN-filled
// (0xff bytes), as on a GPU nothing initialises them. A barrier that cannot complete (threads of a
// block at different barriers forever, or a thread that exits while others wait) aborts with a
// message.
//
// nvcuda::wmma: each lane's fragment holds the WHOLE tile (num_elements = rows·cols), so loads,
// stores, fill and mma are exact under any element mapping and element-wise loops over x[] behave
// as on the GPU (code that depends on which lane holds which element cannot be emulated, and the
// kernels have none). store_matrix_sync writes from each lane only its share of the tile, so a
// lane that reads a stored tile before __syncwarp sees what the other lanes have not yet written. mma_sync truncates its operands to TF32 (as the tensor cores read them) and accumulates
// in float32; __float_to_tf32 rounds to nearest, ties away from zero (cvt.rna.tf32.f32). Alignment
// rules of load/store (32-byte pointers, ldm a multiple of 16 bytes) are checked.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "check.h"

#define MK_CUDA_EMULATION 1

// ---- qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static
#define __align__(n) alignas(n)

// ---- built-in variables -----------------------------------------------------------------------
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// One OS thread runs every emulated thread, so plain globals hold the current thread's indices
// (the scheduler sets them on every switch). inline: one definition across translation units.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline void __trap() {
  std::fprintf(stderr, "cuda emulation: __trap() at thread %u of block %u\n", threadIdx.x,
               blockIdx.x);
  std::abort();
}

// ---- 16-bit floats (round to nearest even, like __float2half_rn / __float2bfloat16_rn) -------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace mk_emu {
inline uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}
inline float bits_float(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}
}  // namespace mk_emu

inline float __bfloat162float(__nv_bfloat16 h) { return mk_test::bfloat16_bits_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return {mk_test::bfloat16_bits_rn(v)}; }
inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu,
                 m = h.bits & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m · 2^-24, exact
    const float mag = std::ldexp(float(m), -24);
    return sign ? -mag : mag;
  }
  if (e == 31) return mk_emu::bits_float(sign | 0x7f800000u | (m << 13));
  return mk_emu::bits_float(sign | ((e + 112u) << 23) | (m << 13));
}
inline __half __float2half_rn(float v) {
  uint32_t x = mk_emu::float_bits(v);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return {uint16_t(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (x >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // ≥ 65520 rounds to infinity
  if (x < 0x38800000u) {  // below 2^-14: a subnormal (or zero) half, in units of 2^-24
    const float units = std::nearbyint(std::fabs(v) * 16777216.f);  // exact scaling, then RNE
    return {uint16_t(sign | uint16_t(units))};
  }
  const uint32_t rounded = x + 0xfffu + ((x >> 13) & 1u) - 0x38000000u;
  return {uint16_t(sign | (rounded >> 13))};
}

// ---- runtime API ------------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace mk_emu {

// The emulated device; tests change it (e.g. a small max_smem_optin forces the global-memory
// workspace path, major = 7 a GPU without TF32 tensor cores).
struct DeviceProps {
  int sms = 132;
  int max_smem_optin = 232448;  // 227 KB, H100
  int major = 9;
};
inline DeviceProps& device() {
  static DeviceProps props;
  return props;
}

inline cudaError_t& last_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}

// Per kernel: the MaxDynamicSharedMemorySize set by cudaFuncSetAttribute (default 48 KB).
inline std::map<const void*, int>& func_max_dynamic_smem() {
  static std::map<const void*, int> attrs;
  return attrs;
}

struct Counters {
  int64_t launches = 0, blocks = 0, allocations = 0, live_allocations = 0;
};
inline Counters& counters() {
  static Counters c;
  return c;
}

}  // namespace mk_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = mk_emu::last_error();
  mk_emu::last_error() = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = mk_emu::device().sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = mk_emu::device().major; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = mk_emu::device().max_smem_optin;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > mk_emu::device().max_smem_optin)
    return cudaErrorInvalidValue;
  mk_emu::func_max_dynamic_smem()[reinterpret_cast<const void*>(func)] = value;
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** ptr, size_t bytes, cudaStream_t) {
  *ptr = std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
  if (!*ptr) return cudaErrorMemoryAllocation;
  std::memset(*ptr, 0xff, bytes);  // NaN floats: nothing initialises device memory
  ++mk_emu::counters().allocations;
  ++mk_emu::counters().live_allocations;
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) {
  if (ptr) --mk_emu::counters().live_allocations;
  std::free(ptr);
  return cudaSuccess;
}

// ---- the block scheduler ------------------------------------------------------------------------
namespace mk_emu {

constexpr int kWarpSize = 32;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  enum State { kReady, kBlockBarrier, kWarpBarrier, kDone } state = kReady;
  uint64_t wait_generation = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  int live = 0;
  // __syncthreads
  int block_arrived = 0;
  uint64_t block_generation = 0;
  // per-warp barriers (__syncwarp, shuffles) and the shuffles' exchange buffer
  std::vector<int> warp_arrived, warp_live;
  std::vector<uint64_t> warp_generation;
  std::vector<float> exchange;
  // dynamic shared memory
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline Block*& current_block() {
  static Block* block = nullptr;
  return block;
}

inline std::mt19937& schedule_rng() {
  static std::mt19937 rng(12345u);
  return rng;
}
inline void set_schedule_seed(unsigned seed) { schedule_rng().seed(seed); }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s (block %u,%u)\n", what, blockIdx.x, blockIdx.y);
  std::abort();
}

inline void yield_to_scheduler() {
  Block& b = *current_block();
  if (swapcontext(&b.fibers[b.current].context, &b.scheduler) != 0) fail("swapcontext failed");
}

inline void fiber_entry() {
  Block& b = *current_block();
  b.body(b.body_arg);
  Block& after = *current_block();
  Fiber& self = after.fibers[after.current];
  self.state = Fiber::kDone;
  --after.live;
  const int warp = after.current / kWarpSize;
  --after.warp_live[warp];
  if (after.block_arrived > 0) fail("a thread exited while others wait at __syncthreads");
  if (after.warp_arrived[warp] > 0) fail("a thread exited while its warp waits at a warp barrier");
  // returns to the scheduler through uc_link
}

inline void syncthreads() {
  Block& b = *current_block();
  if (++b.block_arrived == b.live) {
    b.block_arrived = 0;
    ++b.block_generation;
    return;
  }
  Fiber& f = b.fibers[b.current];
  f.state = Fiber::kBlockBarrier;
  f.wait_generation = b.block_generation;
  yield_to_scheduler();
}

inline void syncwarp(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks are emulated");
  Block& b = *current_block();
  const int warp = b.current / kWarpSize;
  if (++b.warp_arrived[warp] == b.warp_live[warp]) {
    b.warp_arrived[warp] = 0;
    ++b.warp_generation[warp];
    return;
  }
  Fiber& f = b.fibers[b.current];
  f.state = Fiber::kWarpBarrier;
  f.wait_generation = b.warp_generation[warp];
  yield_to_scheduler();
}

// The value of `v` held by lane `source(lane)` of the calling warp.
template <typename Source>
inline float shuffle(unsigned mask, float v, Source source) {
  Block& b = *current_block();
  const int lane = b.current % kWarpSize, warp_base = b.current - lane;
  b.exchange[b.current] = v;
  syncwarp(mask);
  const int from = source(lane);
  const float out = b.exchange[warp_base + ((from >= 0 && from < kWarpSize) ? from : lane)];
  syncwarp(mask);  // the buffer is reused by the next shuffle
  return out;
}

// Runs one block: every thread calls body(arg).
inline void run_block(Block& b, unsigned threads, size_t smem_bytes, void (*body)(void*),
                      void* arg) {
  constexpr size_t kStackBytes = 256 * 1024;
  if (b.fibers.size() != threads) {
    b.fibers = std::vector<Fiber>(threads);
    for (auto& f : b.fibers) f.stack.reset(new char[kStackBytes]);
  }
  const int warps = int((threads + kWarpSize - 1) / kWarpSize);
  b.warp_arrived.assign(warps, 0);
  b.warp_live.assign(warps, 0);
  b.warp_generation.assign(warps, 0);
  b.exchange.assign(size_t(warps) * kWarpSize, 0.f);
  b.block_arrived = 0;
  b.live = int(threads);
  b.body = body;
  b.body_arg = arg;
  // Dynamic shared memory: 128-byte aligned, NaN-filled.
  b.smem_storage.assign(smem_bytes + 128, 0xff);
  const uintptr_t base = reinterpret_cast<uintptr_t>(b.smem_storage.data());
  b.smem = b.smem_storage.data() + ((128 - base % 128) % 128);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.state = Fiber::kReady;
    ++b.warp_live[t / kWarpSize];
    if (getcontext(&f.context) != 0) fail("getcontext failed");
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, &fiber_entry, 0);
  }
  std::vector<int> order(threads);
  for (unsigned t = 0; t < threads; ++t) order[t] = int(t);
  Block* const outer = current_block();
  current_block() = &b;
  const auto runnable = [&](int t) {
    const Fiber& f = b.fibers[t];
    if (f.state == Fiber::kDone) return false;
    if (f.state == Fiber::kBlockBarrier && f.wait_generation == b.block_generation) return false;
    if (f.state == Fiber::kWarpBarrier && f.wait_generation == b.warp_generation[t / kWarpSize])
      return false;
    return true;
  };
  std::vector<char> warp_delayed(size_t(warps), 0);
  while (b.live > 0) {
    // A round: the runnable threads in a random order, each to its next barrier; every warp is
    // held back with probability 1/2 (warps progress at different speeds, as on a GPU), unless
    // that would leave nothing to run.
    std::shuffle(order.begin(), order.end(), schedule_rng());
    bool any = false;
    for (int t : order) any = any || runnable(t);
    if (!any) fail("deadlock: threads wait at barriers that cannot complete");
    bool progress = false;
    while (!progress) {
      for (auto& d : warp_delayed) d = char(schedule_rng()() & 1u);
      for (int t : order) progress = progress || (runnable(t) && !warp_delayed[t / kWarpSize]);
    }
    for (int t : order) {
      Fiber& f = b.fibers[t];
      if (!runnable(t) || warp_delayed[t / kWarpSize]) continue;
      f.state = Fiber::kReady;
      b.current = t;
      threadIdx.x = unsigned(t);
      threadIdx.y = threadIdx.z = 0;
      if (swapcontext(&b.scheduler, &f.context) != 0) fail("swapcontext failed");
    }
  }
  current_block() = outer;
}

inline unsigned char* dynamic_smem_base() {
  if (!current_block()) fail("dynamic shared memory outside a kernel");
  return current_block()->smem;
}

// A kernel launch: checks the configuration like the runtime does (a failure is reported by
// cudaGetLastError), then runs the blocks in order.
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;

  template <typename... Args>
  void operator()(Args&&... args) const {
    const int allowed = [&] {
      const auto it = func_max_dynamic_smem().find(reinterpret_cast<const void*>(kernel));
      return it == func_max_dynamic_smem().end() ? 48 * 1024 : it->second;
    }();
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.y != 1 || block.z != 1 || grid.x == 0 ||
        grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
        grid.x > 2147483647u) {
      last_error() = cudaErrorInvalidConfiguration;
      return;
    }
    if (smem > size_t(allowed)) {
      last_error() = cudaErrorInvalidValue;
      return;
    }
    ++counters().launches;
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    struct Call {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...>* params;
      static void run(void* self) {
        Call* c = static_cast<Call*>(self);
        std::apply(c->kernel, *c->params);
      }
    } call{kernel, &params};
    Block b;
    gridDim = grid;
    blockDim = block;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx.x = x;
          blockIdx.y = y;
          blockIdx.z = z;
          ++counters().blocks;
          run_block(b, unsigned(threads), smem, &Call::run, &call);
        }
  }
};

template <typename... Params>
Launch<Params...> launcher(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                           cudaStream_t) {
  return Launch<Params...>{kernel, grid, block, smem};
}

}  // namespace mk_emu

#define MK_LAUNCH(kernel, grid, block, smem, stream) \
  ::mk_emu::launcher(kernel, grid, block, smem, stream)
#define MK_DYNAMIC_SMEM(type, name) \
  type* const name = reinterpret_cast<type*>(::mk_emu::dynamic_smem_base())
#define MK_DYNAMIC_SMEM_ALIGNED(type, name, alignment) MK_DYNAMIC_SMEM(type, name)

inline void __syncthreads() { mk_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { mk_emu::syncwarp(mask); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  if (width != 32) mk_emu::fail("only width-32 shuffles are emulated");
  return mk_emu::shuffle(mask, v, [&](int lane) { return lane ^ lane_mask; });
}
inline float __shfl_down_sync(unsigned mask, float v, unsigned delta, int width = 32) {
  if (width != 32) mk_emu::fail("only width-32 shuffles are emulated");
  return mk_emu::shuffle(mask, v, [&](int lane) { return lane + int(delta); });
}
inline float __shfl_sync(unsigned mask, float v, int src_lane, int width = 32) {
  if (width != 32) mk_emu::fail("only width-32 shuffles are emulated");
  return mk_emu::shuffle(mask, v, [&](int) { return src_lane & 31; });
}

// ---- nvcuda::wmma (TF32 m16n16k8 and float accumulators) ---------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// cvt.rna.tf32.f32: 10 mantissa bits, round to nearest, ties away from zero.
inline float __float_to_tf32(float v) {
  const uint32_t b = mk_emu::float_bits(v);
  if ((b & 0x7f800000u) == 0x7f800000u) return v;  // inf, NaN
  return mk_emu::bits_float((b + 0x1000u) & 0xffffe000u);
}

template <typename Use, int M, int N, int K>
struct fragment_shape;
template <int M, int N, int K>
struct fragment_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct fragment_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct fragment_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

// Every lane holds the whole tile, row-major: x[r·cols + c].
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = fragment_shape<Use, M, N, K>::rows;
  static constexpr int cols = fragment_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
};

namespace detail {
inline void check_pointer(const void* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) mk_emu::fail("wmma pointer not 32-byte aligned");
  if (ldm % 4 != 0) mk_emu::fail("wmma ldm not a multiple of 16 bytes");
}
inline float tf32_truncate(float v) { return mk_emu::bits_float(mk_emu::float_bits(v) & 0xffffe000u); }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

// matrix_a / matrix_b with a compile-time layout.
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ldm) {
  static_assert(std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value,
                "load_matrix_sync without a layout needs a matrix_a/matrix_b fragment");
  detail::check_pointer(p, ldm);
  using Frag = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c)
      f.x[r * Frag::cols + c] =
          std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm,
                      layout_t layout) {
  detail::check_pointer(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

// Each lane stores M·N/32 consecutive elements (lane l: e in [l·M·N/32, (l+1)·M·N/32)), a mapping
// unlike the lane-strided epilogues of the kernels: the tile is complete only once every lane of
// the warp has stored, so a reader that skips __syncwarp sees unwritten elements.
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  detail::check_pointer(p, ldm);
  constexpr int kPerLane = M * N / 32;
  const int lane = int(threadIdx.x % 32);
  for (int e = lane * kPerLane; e < (lane + 1) * kPerLane; ++e) {
    const int r = e / N, c = e % N;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
  }
}

template <int M, int N, int K, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, precision::tf32, LA>& a,
              const fragment<matrix_b, M, N, K, precision::tf32, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k)
        acc += detail::tf32_truncate(a.x[i * K + k]) * detail::tf32_truncate(b.x[k * N + j]);
      out[i * N + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
