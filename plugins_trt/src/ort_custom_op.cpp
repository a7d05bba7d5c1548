// bitsfusion::LowBitDequant for ONNX Runtime (CPU execution provider), so the custom-op graphs
// run in onnxruntime as exported, without lowering:
//   so = onnxruntime.SessionOptions(); so.register_custom_ops_library("libbf_ort_op.so")
// Written against the C API only (ABI-stable across ORT releases; compiled with API 21 headers,
// it loads in any ORT >= 1.21). Errors come back as OrtStatus; no exception leaves the library.
#include <onnxruntime_c_api.h>

#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "decode_common.h"
#include "op_fields.h"

namespace {

OrtApi const* gApi = nullptr;

struct Kernel {
  bf_decode_desc desc;
  std::vector<int64_t> shape;
  int64_t codes_bytes;
};

OrtStatus* error(std::string const& msg) { return gApi->CreateStatus(ORT_INVALID_ARGUMENT, msg.c_str()); }

ONNXTensorElementDataType ort_type(int64_t dtype) {
  return dtype == BF_DTYPE_FLOAT16    ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
         : dtype == BF_DTYPE_BFLOAT16 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16
                                      : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

#define RETURN_IF_ERROR(expr)        \
  do {                               \
    OrtStatus* s_ = (expr);          \
    if (s_ != nullptr) return s_;    \
  } while (0)

OrtStatus* read_fields(OrtKernelInfo const* info, bf::OpFields& f) {
  std::string const op = BF_OP_NAME;
  for (auto [name, out] : {std::pair{BF_FIELD_BITS, &f.bits}, {BF_FIELD_LEVELS, &f.levels}, {BF_FIELD_PER_FIELD, &f.per_field},
                           {BF_FIELD_FIELD_BITS, &f.field_bits}, {BF_FIELD_DTYPE, &f.dtype}}) {
    OrtStatus* s = gApi->KernelInfoGetAttribute_int64(info, name, out);
    if (s != nullptr) {
      gApi->ReleaseStatus(s);
      return error(op + ": missing or non-integer attribute '" + name + "'");
    }
  }
  size_t len = 0;
  OrtStatus* s = gApi->KernelInfoGetAttribute_string(info, BF_FIELD_GRID, nullptr, &len);
  if (s != nullptr) {
    gApi->ReleaseStatus(s);
    return error(op + ": missing attribute '" BF_FIELD_GRID "'");
  }
  std::vector<char> grid(len + 1, 0);
  RETURN_IF_ERROR(gApi->KernelInfoGetAttribute_string(info, BF_FIELD_GRID, grid.data(), &len));
  f.grid = grid.data();
  len = 0;
  s = gApi->KernelInfoGetAttributeArray_int64(info, BF_FIELD_SHAPE, nullptr, &len);
  if (s != nullptr) {
    gApi->ReleaseStatus(s);
    return error(op + ": missing attribute '" BF_FIELD_SHAPE "'");
  }
  f.shape.assign(len, 0);
  if (len > 0) RETURN_IF_ERROR(gApi->KernelInfoGetAttributeArray_int64(info, BF_FIELD_SHAPE, f.shape.data(), &len));
  return nullptr;
}

OrtStatus* ORT_API_CALL create_kernel(OrtCustomOp const*, OrtApi const*, OrtKernelInfo const* info, void** kernel) {
  bf::OpFields f;
  RETURN_IF_ERROR(read_fields(info, f));
  bf_decode_desc desc{};
  std::vector<int32_t> shape;
  std::string e = bf::describe(f, desc, shape);
  if (!e.empty()) return error(e);
  auto* k = new (std::nothrow) Kernel{desc, f.shape, bf::packed_bytes(desc)};
  if (k == nullptr) return gApi->CreateStatus(ORT_FAIL, "out of memory");
  *kernel = k;
  return nullptr;
}

OrtStatus* type_and_count(OrtValue const* value, ONNXTensorElementDataType& type, size_t& count) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF_ERROR(gApi->GetTensorTypeAndShape(value, &info));
  OrtStatus* s = gApi->GetTensorElementType(info, &type);
  if (s == nullptr) s = gApi->GetTensorShapeElementCount(info, &count);
  gApi->ReleaseTensorTypeAndShapeInfo(info);
  return s;
}

OrtStatus* ORT_API_CALL compute(void* op_kernel, OrtKernelContext* context) {
  auto const* k = static_cast<Kernel const*>(op_kernel);
  std::string const op = BF_OP_NAME;
  OrtValue const* codes = nullptr;
  OrtValue const* scale = nullptr;
  RETURN_IF_ERROR(gApi->KernelContext_GetInput(context, 0, &codes));
  RETURN_IF_ERROR(gApi->KernelContext_GetInput(context, 1, &scale));
  ONNXTensorElementDataType codes_type, scale_type;
  size_t codes_n = 0, scale_n = 0;
  RETURN_IF_ERROR(type_and_count(codes, codes_type, codes_n));
  RETURN_IF_ERROR(type_and_count(scale, scale_type, scale_n));
  if (codes_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || static_cast<int64_t>(codes_n) != k->codes_bytes) {
    return error(op + ": codes must be a uint8 buffer of " + std::to_string(k->codes_bytes) + " bytes");
  }
  if ((scale_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && scale_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) ||
      static_cast<int64_t>(scale_n) != k->desc.rows) {
    return error(op + ": scale must be " + std::to_string(k->desc.rows) + " float32 or float16 values");
  }
  bf_decode_desc d = k->desc;
  d.scale_dtype = scale_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? BF_DTYPE_FLOAT16 : BF_DTYPE_FLOAT32;
  OrtValue* out = nullptr;
  RETURN_IF_ERROR(gApi->KernelContext_GetOutput(context, 0, k->shape.data(), k->shape.size(), &out));
  void* codes_data = nullptr;
  void* scale_data = nullptr;
  void* out_data = nullptr;
  // API 21 has no read-only accessor; the inputs are only read.
  RETURN_IF_ERROR(gApi->GetTensorMutableData(const_cast<OrtValue*>(codes), &codes_data));
  RETURN_IF_ERROR(gApi->GetTensorMutableData(const_cast<OrtValue*>(scale), &scale_data));
  RETURN_IF_ERROR(gApi->GetTensorMutableData(out, &out_data));
  // ORT's CPU allocator aligns tensors to 64 bytes, so the 32-bit word loads are aligned.
  int32_t st = bf_decode_cpu(&d, static_cast<uint8_t const*>(codes_data), k->codes_bytes, scale_data, out_data);
  if (st != BF_OK) return error(op + ": " + bf_status_string(st));
  return nullptr;
}

// The output's element type comes from the `dtype` attribute and its shape from `shape`.
OrtStatus* ORT_API_CALL infer_shape(OrtCustomOp const*, OrtShapeInferContext* ctx) {
  OrtOpAttr const* attr = nullptr;
  int64_t dtype = BF_DTYPE_FLOAT32;
  size_t len = 0;
  RETURN_IF_ERROR(gApi->ShapeInferContext_GetAttribute(ctx, BF_FIELD_DTYPE, &attr));
  if (attr != nullptr) RETURN_IF_ERROR(gApi->ReadOpAttr(attr, ORT_OP_ATTR_INT, &dtype, sizeof(dtype), &len));
  std::vector<int64_t> shape(8, 0);
  RETURN_IF_ERROR(gApi->ShapeInferContext_GetAttribute(ctx, BF_FIELD_SHAPE, &attr));
  if (attr == nullptr) return error(BF_OP_NAME ": missing attribute 'shape'");
  OrtStatus* s = gApi->ReadOpAttr(attr, ORT_OP_ATTR_INTS, shape.data(), shape.size() * sizeof(int64_t), &len);
  if (s != nullptr) {
    gApi->ReleaseStatus(s);
    return error(BF_OP_NAME ": attribute 'shape' must be 1 to 8 integers");
  }
  shape.resize(len / sizeof(int64_t) < shape.size() ? len / sizeof(int64_t) : shape.size());
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF_ERROR(gApi->CreateTensorTypeAndShapeInfo(&info));
  OrtStatus* r = gApi->SetTensorElementType(info, ort_type(dtype));
  if (r == nullptr) r = gApi->SetDimensions(info, shape.data(), shape.size());
  if (r == nullptr) r = gApi->ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
  gApi->ReleaseTensorTypeAndShapeInfo(info);
  return r;
}

void ORT_API_CALL destroy_kernel(void* op_kernel) { delete static_cast<Kernel*>(op_kernel); }
char const* ORT_API_CALL op_name(OrtCustomOp const*) { return BF_OP_NAME; }
char const* ORT_API_CALL op_provider(OrtCustomOp const*) { return "CPUExecutionProvider"; }
size_t ORT_API_CALL two(OrtCustomOp const*) { return 2; }
size_t ORT_API_CALL one(OrtCustomOp const*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL input_type(OrtCustomOp const*, size_t index) {
  return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
ONNXTensorElementDataType ORT_API_CALL output_type(OrtCustomOp const*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(OrtCustomOp const*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType ORT_API_CALL default_mem(OrtCustomOp const*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL start_version(OrtCustomOp const*) { return 1; }
int ORT_API_CALL end_version(OrtCustomOp const*) { return 1; }

OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = ORT_API_VERSION;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = input_type;
  op.GetInputTypeCount = two;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = one;
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = required;
  op.GetOutputCharacteristic = required;
  op.GetInputMemoryType = default_mem;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.InferOutputShapeFn = infer_shape;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

OrtCustomOp gOp = make_op();

}  // namespace

extern "C" BF_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, OrtApiBase const* api_base) {
  gApi = api_base->GetApi(ORT_API_VERSION);
  if (gApi == nullptr) return nullptr;  // an ORT older than the headers: it reports the failed registration itself
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF_ERROR(gApi->CreateCustomOpDomain(BF_OP_DOMAIN, &domain));
  RETURN_IF_ERROR(gApi->CustomOpDomain_Add(domain, &gOp));
  // The domain must outlive every session using it; one per process is enough and is kept.
  return gApi->AddCustomOpDomain(options, domain);
}
