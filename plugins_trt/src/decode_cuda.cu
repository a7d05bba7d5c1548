// CUDA decode kernels.
//
// A thread decodes M whole fields of one row (M*K values, a multiple of the vector width V)
// and writes them with 16-byte stores, V = 16 / sizeof(output): every index is a compile-time
// constant, so values stay in registers and there is no per-value branching. Rows whose
// length is not a multiple of V, or unaligned outputs, take the scalar variant (one field per
// thread). Levels become floats by the 2^23 trick (an FADD) instead of an integer conversion,
// which runs at a quarter of the rate on recent GPUs.
//
// 3-level (1-bit balanced) weights into 16-bit outputs, three quarters of a 1.99-bit SD-v1.5 UNet,
// take a select path instead: a row has only three output values, so a thread computes them once
// (exactly as above) and picks each pair of outputs with one byte permute. The permute's selector
// for a packed byte comes from a 256-entry table in shared memory, so the five base-3 digits are
// not divided out one by one: a few instructions a value instead of about 16, the same bits.
//
// bf_decode_cuda: one launch per weight (what the TensorRT plugin's enqueue does).
// bf_decode_cuda_batch: many weights per launch, one launch per packing present (the PyTorch
// runtime's whole-UNet decode), so the hundreds of small SD-v1.5 weights do not each pay a
// kernel's fill and drain.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

#include "decode_common.h"
#include "dispatch.h"

namespace bf {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

// Values per thread: a multiple of both K (whole fields) and V (whole vectors), at least ~24.
template <int K, int V>
struct Chunk {
  static constexpr int LCM = K / gcd(K, V) * V;
  static constexpr int OUT = LCM >= 24 ? LCM : LCM * ((24 + LCM - 1) / LCM);
};

struct WeightArgs {
  const uint32_t* words;
  const void* scale;
  void* out;
  uint64_t row_bits;  // 8 * bytes per row
  uint32_t row_len;
  uint32_t fields_per_row;
  uint32_t chunks_per_row;
  uint32_t chunks;  // rows * chunks_per_row: one thread each
  uint32_t last_word;  // index of the buffer's last 32-bit word
  int32_t scale_f16;
};

// Shared memory a block stages its values in: 256 threads x up to 56 values of 2 bytes, or 40 of 4.
constexpr int kStageBytes = 40 * 1024;

// The select path's table: for a packed byte of five base-3 digits c, the byte (2c) | (2c+1) << 4
// per digit, a permute selector nibble pair that picks 16-bit value c out of two 32-bit words.
// Digits 0-3 in x, digit 4 in y. Bytes past 242 never reach a stored value; their digits stay <= 3.
__device__ __forceinline__ uint2 select_entry(uint32_t f) {
  uint32_t sel[5];
#pragma unroll
  for (int t = 0; t < 5; ++t) {
    sel[t] = 0x10u + 0x22u * (t < 4 ? f % 3 : f);
    f /= 3;
  }
  return make_uint2(sel[0] | sel[1] << 8 | sel[2] << 16 | sel[3] << 24, sel[4]);
}

template <typename OutT>
__device__ __forceinline__ uint32_t bits16(OutT v) {
  return uint32_t(*reinterpret_cast<const uint16_t*>(&v));
}

template <int B, bool PLAIN, typename OutT, bool VEC>
struct Decoder {
  using P = Pack<B, PLAIN>;
  static constexpr int V = VEC ? int(16 / sizeof(OutT)) : 1;
  static constexpr int OUT = VEC ? Chunk<P::K, V>::OUT : P::K;
  static constexpr int M = OUT / P::K;
  static constexpr bool SELECT = VEC && !PLAIN && B == 1 && sizeof(OutT) == 2;
  static_assert(!VEC || kThreads * OUT * sizeof(OutT) <= kStageBytes, "stage buffer too small");
  static_assert(!SELECT || (P::L == 3 && P::K == 5 && P::F == 8 && OUT % 2 == 0), "select path: byte fields of five base-3 digits");

  // The output position of chunk c, and the number of its values inside its row.
  static __device__ __forceinline__ uint64_t position(const WeightArgs& w, uint32_t c, uint32_t& o, uint32_t& i0) {
    o = c / w.chunks_per_row;
    i0 = (c - o * w.chunks_per_row) * OUT;
    return uint64_t(o) * w.row_len + i0;
  }

  // Code ``code``'s output for a row scaled by ``s``: the one expression both paths use, so they give the same bits.
  static __device__ __forceinline__ OutT level(uint32_t code, float s) {
    constexpr float kBias = 8388608.0f - float(P::QMIN);  // 2^23 + code, minus this, is code + qmin exactly
    return from_float<OutT>((__uint_as_float(0x4B000000u | code) - kBias) * s);
  }

  static __device__ __forceinline__ void decode(const WeightArgs& w, uint32_t o, uint32_t i0, OutT (&vals)[OUT], const uint2* table) {
    const float s = w.scale_f16 ? __half2float(static_cast<const __half*>(w.scale)[o]) : static_cast<const float*>(w.scale)[o];
    const uint64_t row_bit = uint64_t(o) * w.row_bits;
    const uint32_t j0 = i0 / P::K;
    // The thread's M fields are one run of M*F bits: load the aligned words around it once and
    // shift them so the run starts at bit 0; every field is then at a compile-time bit offset.
    // Words past the buffer are clamped to its last one: they only feed fields past the row's
    // end (the last chunk of a row), whose values are never stored.
    constexpr int U = (M * P::F + 31) / 32 + 1;
    const uint64_t bit0 = row_bit + uint64_t(j0) * P::F;
    const uint32_t w0 = uint32_t(bit0 >> 5), sh = uint32_t(bit0 & 31);
    uint32_t raw[U + 1], u[U];
#pragma unroll
    for (int k = 0; k <= U; ++k) raw[k] = __ldg(w.words + min(w0 + k, w.last_word));
#pragma unroll
    for (int k = 0; k < U; ++k) u[k] = __funnelshift_r(raw[k], raw[k + 1], sh);
    if constexpr (SELECT) {
      // The row's three outputs: values 0, 1 in lo, 2 in hi.
      const uint32_t lo = bits16(level(0, s)) | bits16(level(1, s)) << 16, hi = bits16(level(2, s));
      uint2 e[M];
#pragma unroll
      for (int m = 0; m < M; ++m) e[m] = table[(u[m / 4] >> (8 * (m % 4))) & 0xffu];
      uint32_t* pairs = reinterpret_cast<uint32_t*>(vals);
#pragma unroll
      for (int p = 0; p < OUT / 2; ++p) {
        const int a = 2 * p, b = 2 * p + 1;  // value a is digit a % 5 of field a / 5
        const uint32_t ra = a % 5 < 4 ? e[a / 5].x : e[a / 5].y, rb = b % 5 < 4 ? e[b / 5].x : e[b / 5].y;
        const uint32_t sel = __byte_perm(ra, rb, uint32_t(a % 5 < 4 ? a % 5 : 0) | uint32_t(4 + (b % 5 < 4 ? b % 5 : 0)) << 4);
        pairs[p] = __byte_perm(lo, hi, sel);
      }
    } else {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const int b = m * P::F;
        uint32_t f = b % 32 + P::F <= 32 ? (u[b / 32] >> (b % 32)) : uint32_t((uint64_t(u[b / 32 + 1]) << 32 | u[b / 32]) >> (b % 32));
        f &= P::MASK;
#pragma unroll
        for (int t = 0; t < P::K; ++t) {
          const uint32_t code = f % P::L;
          f /= P::L;
          vals[m * P::K + t] = level(code, s);
        }
      }
    }
  }

  // The block's chunks cover one contiguous range of the output (a row's last chunk stops at
  // the row's end, where the next row begins). Threads decode into shared memory, then the block
  // writes the range with coalesced 16-byte stores: adjacent threads, adjacent addresses.
  static __device__ __forceinline__ void run_block(const WeightArgs& w, uint32_t block, uint4* stage, const uint2* table) {
    const uint32_t first = block * kThreads;
    const uint32_t c = first + threadIdx.x;
    OutT* out = static_cast<OutT*>(w.out);
    if constexpr (VEC) {
      uint32_t o, i0, o_first, i_first;
      const uint64_t start = position(w, first, o_first, i_first);
      const uint32_t last = min(first + kThreads, w.chunks) - 1;
      uint32_t o_last, i_last;
      const uint64_t last_pos = position(w, last, o_last, i_last);
      const uint64_t end = last_pos + min(uint32_t(OUT), w.row_len - i_last);
      if (c < w.chunks) {
        const uint64_t pos = position(w, c, o, i0);
        alignas(16) OutT vals[OUT];
        decode(w, o, i0, vals, table);
        OutT* dst = reinterpret_cast<OutT*>(stage) + (pos - start);
#pragma unroll
        for (int v = 0; v < OUT / V; ++v) {
          if (i0 + v * V < w.row_len) {  // row_len is a multiple of V here: a vector is whole or absent
            *reinterpret_cast<uint4*>(dst + v * V) = *reinterpret_cast<const uint4*>(vals + v * V);
          }
        }
      }
      __syncthreads();
      uint4* gdst = reinterpret_cast<uint4*>(out + start);
      const uint32_t nvec = uint32_t((end - start) / V);
      for (uint32_t k = threadIdx.x; k < nvec; k += kThreads) gdst[k] = stage[k];
    } else {
      if (c >= w.chunks) return;
      uint32_t o, i0;
      const uint64_t pos = position(w, c, o, i0);
      OutT vals[OUT];
      decode(w, o, i0, vals, table);
#pragma unroll
      for (int t = 0; t < OUT; ++t) {
        if (i0 + t < w.row_len) out[pos + t] = vals[t];
      }
    }
  }
};

template <bool SELECT>
__device__ __forceinline__ void fill_table(uint2* table) {
  if constexpr (SELECT) {
    for (uint32_t f = threadIdx.x; f < 256; f += kThreads) table[f] = select_entry(f);
    __syncthreads();
  }
}

template <int B, bool PLAIN, typename OutT, bool VEC>
__global__ void __launch_bounds__(kThreads) decode_kernel(WeightArgs w) {
  using D = Decoder<B, PLAIN, OutT, VEC>;
  __shared__ uint4 stage[VEC ? kThreads * D::OUT * sizeof(OutT) / 16 : 1];
  __shared__ uint2 table[D::SELECT ? 256 : 1];
  fill_table<D::SELECT>(table);
  D::run_block(w, blockIdx.x, stage, table);
}

// Batched: the weights' block ranges are consecutive; a block finds its weight by bisection
// in the launch's parameters (captured by value in CUDA graphs, no device table to manage).
constexpr int kMaxBatch = 384;  // 384 entries of 64 bytes: within the 32 KB kernel parameter limit

struct BatchEntry {
  WeightArgs w;
  uint32_t first_block;
};

struct Batch {
  int32_t n;
  uint32_t blocks;  // the work's blocks; the grid may be smaller (then each block loops)
  BatchEntry e[kMaxBatch];
};

template <int KIND>
struct Kind {  // KIND = (2 * (bits - 1) + plain) * 2 + vec
  static constexpr int BITS = KIND / 4 + 1;
  static constexpr bool PLAIN = (KIND / 2) % 2 == 1;
  static constexpr bool VEC = KIND % 2 == 1;
};

// One launch per packing present: each kernel is compiled for one packing only, so it keeps
// the registers (and occupancy) of that packing instead of the worst of all 32.
template <typename OutT, int KIND>
__global__ void __launch_bounds__(kThreads) decode_batch_kernel(const __grid_constant__ Batch batch) {
  using D = Decoder<Kind<KIND>::BITS, Kind<KIND>::PLAIN, OutT, Kind<KIND>::VEC>;
  __shared__ uint4 stage[Kind<KIND>::VEC ? kThreads * D::OUT * sizeof(OutT) / 16 : 1];
  __shared__ uint2 table[D::SELECT ? 256 : 1];
  fill_table<D::SELECT>(table);
  for (uint32_t block = blockIdx.x; block < batch.blocks; block += gridDim.x) {
    int lo = 0, hi = batch.n - 1;
    while (lo < hi) {  // the last entry whose first_block <= block
      int mid = (lo + hi + 1) / 2;
      if (batch.e[mid].first_block <= block) lo = mid;
      else hi = mid - 1;
    }
    D::run_block(batch.e[lo].w, block - batch.e[lo].first_block, stage, table);
    __syncthreads();  // the next block's values go into the same stage
  }
}

template <typename OutT, int... KINDS>
void launch_batch(int kind, const Batch& batch, uint32_t grid, cudaStream_t stream, std::integer_sequence<int, KINDS...>) {
  ((kind == KINDS ? (decode_batch_kernel<OutT, KINDS><<<grid, kThreads, 0, stream>>>(batch), 0) : 0), ...);
}

template <typename OutT, int... KINDS>
void launch_one(int kind, const WeightArgs& w, cudaStream_t stream, std::integer_sequence<int, KINDS...>) {
  const uint32_t blocks = (w.chunks + kThreads - 1) / kThreads;
  ((kind == KINDS ? (decode_kernel<Kind<KINDS>::BITS, Kind<KINDS>::PLAIN, OutT, Kind<KINDS>::VEC><<<blocks, kThreads, 0, stream>>>(w), 0)
                  : 0),
   ...);
}

// Host side: the launch geometry of one weight.
template <typename OutT>
struct Plan {
  WeightArgs w;
  int kind;

  template <int B, bool PLAIN>
  int32_t run() {
    constexpr int V = 16 / sizeof(OutT);
    const bool vec = w.row_len % V == 0 && reinterpret_cast<uintptr_t>(w.out) % 16 == 0;
    const uint32_t out_per_thread = vec ? Decoder<B, PLAIN, OutT, true>::OUT : Decoder<B, PLAIN, OutT, false>::OUT;
    w.chunks_per_row = (w.row_len + out_per_thread - 1) / out_per_thread;
    kind = (2 * (B - 1) + (PLAIN ? 1 : 0)) * 2 + (vec ? 1 : 0);
    return BF_OK;
  }
};

int32_t check_args(const bf_decode_desc* d, const uint8_t* codes, int64_t codes_bytes, const void* scale, const void* out) {
  int32_t st = validate(d);
  if (st != BF_OK) return st;
  if (codes == nullptr || scale == nullptr || out == nullptr) return BF_ERR_NULL;
  if (codes_bytes != packed_bytes(*d)) return BF_ERR_CODES_SIZE;
  if (reinterpret_cast<uintptr_t>(codes) % 4 != 0) return BF_ERR_ALIGNMENT;
  return BF_OK;
}

template <typename OutT>
int32_t make_plan(const bf_decode_desc& d, const uint8_t* codes, const void* scale, void* out, Plan<OutT>& plan) {
  plan.w = WeightArgs{reinterpret_cast<const uint32_t*>(codes), scale, out, uint64_t(row_bytes(d)) * 8, uint32_t(d.row_len),
                      uint32_t((d.row_len + d.per_field - 1) / d.per_field), 0, 0, uint32_t(packed_bytes(d) / 4 - 1),
                      d.scale_dtype == BF_DTYPE_FLOAT16};
  int32_t st = dispatch(d, plan);
  plan.w.chunks = uint32_t(d.rows) * plan.w.chunks_per_row;
  return st;
}

template <typename OutT>
int32_t decode_one(const bf_decode_desc& d, const uint8_t* codes, const void* scale, void* out, cudaStream_t stream) {
  Plan<OutT> plan{};
  int32_t st = make_plan(d, codes, scale, out, plan);
  if (st != BF_OK) return st;
  launch_one<OutT>(plan.kind, plan.w, stream, std::make_integer_sequence<int, 32>{});
  return cudaGetLastError() == cudaSuccess ? BF_OK : BF_ERR_CUDA;
}

template <typename OutT>
int32_t decode_batch(const bf_decode_desc* descs, const uint8_t* const* codes, const void* const* scales, void* const* outs, int32_t n,
                     uint32_t max_blocks, cudaStream_t stream) {
  std::vector<Plan<OutT>> plans(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) {
    int32_t st = make_plan(descs[i], codes[i], scales[i], outs[i], plans[i]);
    if (st != BF_OK) return st;
  }
  static Batch batch;  // 24 KB: not on the stack; guarded because callers may use several threads
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  for (int kind = 0; kind < 32; ++kind) {
    batch.n = 0;
    uint32_t blocks = 0;
    for (int32_t i = 0; i <= n; ++i) {
      if (i == n || batch.n == kMaxBatch) {  // launch what is gathered (the parameters are copied at launch)
        if (batch.n > 0) {
          batch.blocks = blocks;
          const uint32_t grid = max_blocks ? std::min(blocks, max_blocks) : blocks;
          launch_batch<OutT>(kind, batch, grid, stream, std::make_integer_sequence<int, 32>{});
        }
        if (cudaGetLastError() != cudaSuccess) return BF_ERR_CUDA;
        batch.n = 0;
        blocks = 0;
        if (i == n) break;
      }
      if (plans[i].kind != kind) continue;
      batch.e[batch.n++] = BatchEntry{plans[i].w, blocks};
      blocks += (plans[i].w.chunks + kThreads - 1) / kThreads;
    }
  }
  return BF_OK;
}

}  // namespace
}  // namespace bf

extern "C" {

int32_t bf_has_cuda(void) { return 1; }

int32_t bf_decode_cuda(const bf_decode_desc* desc, const uint8_t* codes, int64_t codes_bytes, const void* scale, void* out,
                       void* stream) {
  int32_t st = bf::check_args(desc, codes, codes_bytes, scale, out);
  if (st != BF_OK) return st;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (desc->out_dtype) {
    case BF_DTYPE_FLOAT32: return bf::decode_one<float>(*desc, codes, scale, out, s);
    case BF_DTYPE_FLOAT16: return bf::decode_one<__half>(*desc, codes, scale, out, s);
    default: return bf::decode_one<__nv_bfloat16>(*desc, codes, scale, out, s);
  }
}

int32_t bf_decode_cuda_batch(const bf_decode_desc* descs, const uint8_t* const* codes, const int64_t* codes_bytes,
                             const void* const* scales, void* const* outs, int32_t n, int32_t max_blocks, void* stream) {
  if (max_blocks < 0) return BF_ERR_SHAPE;
  if (n < 0 || (n > 0 && (descs == nullptr || codes == nullptr || codes_bytes == nullptr || scales == nullptr || outs == nullptr))) {
    return BF_ERR_NULL;
  }
  for (int32_t i = 0; i < n; ++i) {
    int32_t st = bf::check_args(&descs[i], codes[i], codes_bytes[i], scales[i], outs[i]);
    if (st != BF_OK) return st;
    if (descs[i].out_dtype != descs[0].out_dtype) return BF_ERR_DTYPE;
  }
  if (n == 0) return BF_OK;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  try {  // the plan list allocates; nothing may throw across the C boundary
    switch (descs[0].out_dtype) {
      case BF_DTYPE_FLOAT32: return bf::decode_batch<float>(descs, codes, scales, outs, n, uint32_t(max_blocks), s);
      case BF_DTYPE_FLOAT16: return bf::decode_batch<__half>(descs, codes, scales, outs, n, uint32_t(max_blocks), s);
      default: return bf::decode_batch<__nv_bfloat16>(descs, codes, scales, outs, n, uint32_t(max_blocks), s);
    }
  } catch (...) {
    return BF_ERR_CUDA;
  }
}

}  // extern "C"
