// Host decoder: the reference the CUDA kernels are compared with on the GPU, and the
// implementation of the ONNX Runtime custom op. Tested bit for bit against the numpy decoder.
#include <cstring>

#include "decode_common.h"
#include "dispatch.h"

namespace bf {
namespace {

struct CpuDecode {
  const bf_decode_desc& d;
  const uint32_t* words;
  const void* scale;
  void* out;

  float scale_of(int64_t o) const {
    if (d.scale_dtype == BF_DTYPE_FLOAT16) return f16_bits_to_f32(static_cast<const uint16_t*>(scale)[o]);
    return static_cast<const float*>(scale)[o];
  }

  void store(int64_t idx, float v) const {
    if (d.out_dtype == BF_DTYPE_FLOAT32) static_cast<float*>(out)[idx] = v;
    else if (d.out_dtype == BF_DTYPE_FLOAT16) static_cast<uint16_t*>(out)[idx] = f32_to_f16_bits(v);
    else static_cast<uint16_t*>(out)[idx] = f32_to_bf16_bits(v);
  }

  template <int B, bool PLAIN>
  int32_t run() const {
    using P = Pack<B, PLAIN>;
    const uint64_t row_bits = uint64_t(row_bytes(d)) * 8;
    for (int64_t o = 0; o < d.rows; ++o) {
      const float s = scale_of(o);
      for (int64_t i = 0; i < d.row_len; i += P::K) {
        uint32_t f = field_at<P::F>(words, o * row_bits + uint64_t(i / P::K) * P::F);
        for (int t = 0; t < P::K && i + t < d.row_len; ++t) {
          store(o * d.row_len + i + t, s * float(int(f % P::L) + P::QMIN));
          f /= P::L;
        }
      }
    }
    return BF_OK;
  }
};

}  // namespace
}  // namespace bf

extern "C" {

int32_t bf_abi_version(void) { return BF_ABI_VERSION; }

const char* bf_status_string(int32_t status) {
  switch (status) {
    case BF_OK: return "ok";
    case BF_ERR_BITS: return "bits must be 1..8";
    case BF_ERR_GRID: return "grid must be balanced or plain";
    case BF_ERR_PACKING: return "levels/per_field/field_bits do not match the grid (see docs/FORMAT.md section 4)";
    case BF_ERR_SHAPE: return "rows and row_len must be >= 1 and their product below 2^31";
    case BF_ERR_DTYPE: return "output dtype must be float32/float16/bfloat16 and scale dtype float32/float16";
    case BF_ERR_CODES_SIZE: return "the codes buffer size does not match the shape and packing";
    case BF_ERR_NULL: return "a null pointer was passed";
    case BF_ERR_ALIGNMENT: return "codes must be 4-byte aligned";
    case BF_ERR_CUDA: return "a CUDA kernel launch failed";
    case BF_ERR_NO_CUDA: return "this library was built without CUDA kernels";
    default: return "unknown status";
  }
}

int32_t bf_codes_bytes(const bf_decode_desc* desc, int64_t* nbytes) {
  int32_t st = bf::validate(desc);
  if (st != BF_OK) return st;
  if (nbytes == nullptr) return BF_ERR_NULL;
  *nbytes = bf::packed_bytes(*desc);
  return BF_OK;
}

int32_t bf_decode_cpu(const bf_decode_desc* desc, const uint8_t* codes, int64_t codes_bytes, const void* scale, void* out) {
  int32_t st = bf::validate(desc);
  if (st != BF_OK) return st;
  if (codes == nullptr || scale == nullptr || out == nullptr) return BF_ERR_NULL;
  if (codes_bytes != bf::packed_bytes(*desc)) return BF_ERR_CODES_SIZE;
  if (reinterpret_cast<uintptr_t>(codes) % 4 != 0) return BF_ERR_ALIGNMENT;
  bf::CpuDecode fn{*desc, reinterpret_cast<const uint32_t*>(codes), scale, out};
  return bf::dispatch(*desc, fn);
}

}  // extern "C"
