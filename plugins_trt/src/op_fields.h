// Validation of the op's attributes (TensorRT fields, ONNX Runtime attributes): one place, so
// both refuse the same things with the same words.
#ifndef BF_OP_FIELDS_H
#define BF_OP_FIELDS_H

#include <stdint.h>

#include <string>
#include <vector>

#include "bf_decode.h"

namespace bf {

struct OpFields {
  int64_t bits = 0, levels = 0, per_field = 0, field_bits = 0, dtype = 0;
  std::string grid;
  std::vector<int64_t> shape;
};

// Fills desc (scale dtype float32; callers set it from the input) and the weight shape;
// returns "" or the reason the fields are wrong, prefixed with the op name.
std::string describe(OpFields const& f, bf_decode_desc& desc, std::vector<int32_t>& shape);

}  // namespace bf

#endif  // BF_OP_FIELDS_H
