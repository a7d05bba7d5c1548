// Linked instead of decode_cuda.cu when the library is built without CUDA.
#include "bf_decode.h"

extern "C" {
int32_t bf_has_cuda(void) { return 0; }
int32_t bf_decode_cuda(const bf_decode_desc*, const uint8_t*, int64_t, const void*, void*, void*) { return BF_ERR_NO_CUDA; }
int32_t bf_decode_cuda_batch(const bf_decode_desc*, const uint8_t* const*, const int64_t*, const void* const*, void* const*, int32_t,
                             int32_t, void*) {
  return BF_ERR_NO_CUDA;
}
}
