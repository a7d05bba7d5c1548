/* C ABI of the low-bit decode kernels: what the TensorRT plugin, the ONNX Runtime custom op and
 * Python (ctypes) call. No TensorRT or ONNX Runtime needed. The packed layout is docs/FORMAT.md
 * section 4; the op it implements is bf/format/dequant_op.py.
 *
 * Every function returns BF_OK or an error code; bf_status_string() says what it means. Nothing
 * throws, nothing allocates, nothing keeps state between calls. */
#ifndef BF_DECODE_H
#define BF_DECODE_H

#include <stddef.h>
#include <stdint.h>

#include "bf_op_contract.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define BF_API __declspec(dllexport)
#else
#define BF_API __attribute__((visibility("default")))
#endif

enum bf_status {
  BF_OK = 0,
  BF_ERR_BITS = 1,        /* bits outside 1..8 */
  BF_ERR_GRID = 2,        /* grid is neither balanced (0) nor plain (1) */
  BF_ERR_PACKING = 3,     /* levels / per_field / field_bits do not match the grid */
  BF_ERR_SHAPE = 4,       /* rows or row_len < 1 */
  BF_ERR_DTYPE = 5,       /* output or scale dtype not float32 / float16 / bfloat16 (scale: not bfloat16) */
  BF_ERR_CODES_SIZE = 6,  /* codes buffer size does not match the shape and packing */
  BF_ERR_NULL = 7,        /* a null pointer */
  BF_ERR_ALIGNMENT = 8,   /* codes not 4-byte aligned (the decoder loads aligned 32-bit words) */
  BF_ERR_CUDA = 9,        /* a CUDA launch failed (the kernel library's own CUDA error) */
  BF_ERR_NO_CUDA = 10     /* the library was built without its CUDA kernels */
};

enum bf_grid { BF_GRID_BALANCED = 0, BF_GRID_PLAIN = 1 };

/* One quantized weight: `rows` output channels of `row_len` values each, packed as described. */
typedef struct bf_decode_desc {
  int64_t rows;
  int64_t row_len;
  int32_t bits;
  int32_t grid; /* enum bf_grid */
  int32_t levels;
  int32_t per_field;
  int32_t field_bits;
  int32_t out_dtype;   /* BF_DTYPE_FLOAT32 / FLOAT16 / BFLOAT16 */
  int32_t scale_dtype; /* BF_DTYPE_FLOAT32 / FLOAT16 */
} bf_decode_desc;

BF_API int32_t bf_abi_version(void);
/* 1 when the CUDA kernels are compiled in. */
BF_API int32_t bf_has_cuda(void);
BF_API const char* bf_status_string(int32_t status);
/* Checks the desc; on BF_OK writes the packed buffer size in bytes (tail padding included). */
BF_API int32_t bf_codes_bytes(const bf_decode_desc* desc, int64_t* nbytes);
/* out[o, i] = scale[o] * (code(o, i) + qmin), on the host. */
BF_API int32_t bf_decode_cpu(const bf_decode_desc* desc, const uint8_t* codes, int64_t codes_bytes, const void* scale,
                             void* out);
/* The same on the GPU: device pointers, one launch on `stream` (a cudaStream_t; 0 = default). */
BF_API int32_t bf_decode_cuda(const bf_decode_desc* desc, const uint8_t* codes, int64_t codes_bytes, const void* scale,
                              void* out, void* stream);

/* Several weights in as few launches as possible (one per packing present, and per 384 weights), all with the same
 * out_dtype: element i of each array describes weight i. For decoding a whole model at once. max_blocks > 0 caps
 * each launch's grid (its blocks then loop over the work): a decode that runs beside other kernels takes only that
 * many multiprocessors' worth instead of flooding the GPU. 0: one block per 256 chunks, no cap. */
BF_API int32_t bf_decode_cuda_batch(const bf_decode_desc* descs, const uint8_t* const* codes, const int64_t* codes_bytes,
                                    const void* const* scales, void* const* outs, int32_t n, int32_t max_blocks, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* BF_DECODE_H */
