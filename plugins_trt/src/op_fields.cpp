#include "op_fields.h"

#include "decode_common.h"

namespace bf {

std::string describe(OpFields const& f, bf_decode_desc& desc, std::vector<int32_t>& shape) {
  std::string const op = BF_OP_NAME;
  if (f.shape.empty() || f.shape.size() > 8) return op + ": field '" BF_FIELD_SHAPE "' must be 1 to 8 integers";
  if (f.bits < 1 || f.bits > BF_MAX_BITS) return op + ": bits " + std::to_string(f.bits) + " is outside 1..8";
  if (f.grid != "balanced" && f.grid != "plain") return op + ": grid '" + f.grid + "' is neither 'balanced' nor 'plain'";
  if (f.dtype != BF_DTYPE_FLOAT32 && f.dtype != BF_DTYPE_FLOAT16 && f.dtype != BF_DTYPE_BFLOAT16) {
    return op + ": dtype " + std::to_string(f.dtype) + " is not 1 (float32), 10 (float16) or 16 (bfloat16)";
  }
  shape.clear();
  int64_t row_len = 1;
  for (size_t i = 0; i < f.shape.size(); ++i) {
    int64_t d = f.shape[i];
    if (d < 1 || d > kMaxValues) return op + ": shape has a dimension " + std::to_string(d) + " (each must be >= 1)";
    shape.push_back(static_cast<int32_t>(d));
    if (i > 0) row_len = row_len * d > kMaxValues ? kMaxValues + 1 : row_len * d;
  }
  desc = bf_decode_desc{shape[0],
                        row_len,
                        static_cast<int32_t>(f.bits),
                        f.grid == "plain" ? BF_GRID_PLAIN : BF_GRID_BALANCED,
                        static_cast<int32_t>(f.levels),
                        static_cast<int32_t>(f.per_field),
                        static_cast<int32_t>(f.field_bits),
                        static_cast<int32_t>(f.dtype),
                        BF_DTYPE_FLOAT32};
  int64_t nbytes = 0;
  int32_t st = bf_codes_bytes(&desc, &nbytes);
  if (st == BF_ERR_PACKING) {
    return op + ": packing (levels " + std::to_string(f.levels) + ", per_field " + std::to_string(f.per_field) + ", field_bits " +
           std::to_string(f.field_bits) + ") does not match a " + std::to_string(f.bits) + "-bit " + f.grid + " grid";
  }
  if (st != BF_OK) return op + ": " + bf_status_string(st);
  return "";
}

}  // namespace bf
