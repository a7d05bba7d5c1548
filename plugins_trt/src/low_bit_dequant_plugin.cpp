#include "low_bit_dequant_plugin.h"

#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <optional>

#include "decode_common.h"
#include "op_fields.h"

using namespace nvinfer1;

namespace bf {
namespace {

std::mutex gMutex;
std::string gLastError;
ILoggerFinder* gLoggerFinder = nullptr;

PluginField const* find_field(PluginFieldCollection const* fc, char const* name) {
  for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
    if (fc->fields[i].name != nullptr && std::strcmp(fc->fields[i].name, name) == 0) return &fc->fields[i];
  }
  return nullptr;
}

// Integer fields arrive as kINT32 from TensorRT's ONNX parser; kINT64 and kINT8/16 are accepted too.
std::optional<std::vector<int64_t>> ints_of(PluginField const& f) {
  if (f.data == nullptr || f.length < 0) return std::nullopt;
  std::vector<int64_t> v(static_cast<size_t>(f.length));
  for (int32_t i = 0; i < f.length; ++i) {
    switch (f.type) {
      case PluginFieldType::kINT32: v[i] = static_cast<int32_t const*>(f.data)[i]; break;
      case PluginFieldType::kINT64: v[i] = static_cast<int64_t const*>(f.data)[i]; break;
      case PluginFieldType::kINT16: v[i] = static_cast<int16_t const*>(f.data)[i]; break;
      case PluginFieldType::kINT8: v[i] = static_cast<int8_t const*>(f.data)[i]; break;
      default: return std::nullopt;
    }
  }
  return v;
}

char const* dtype_name(int32_t dtype) {
  return dtype == BF_DTYPE_FLOAT32 ? "float32" : dtype == BF_DTYPE_FLOAT16 ? "float16" : dtype == BF_DTYPE_BFLOAT16 ? "bfloat16" : "?";
}

DataType trt_type(int32_t dtype) {
  return dtype == BF_DTYPE_FLOAT16 ? DataType::kHALF : dtype == BF_DTYPE_BFLOAT16 ? DataType::kBF16 : DataType::kFLOAT;
}

// Reads the fields as TensorRT passes them; returns "" or what is missing or wrong.
std::string parse_fields(PluginFieldCollection const* fc, bf_decode_desc& desc, std::vector<int32_t>& shape, std::string& grid) {
  if (fc == nullptr) return BF_OP_NAME ": no fields given";
  std::string const op = BF_OP_NAME;
  OpFields f;
  for (auto [name, out] : {std::pair{BF_FIELD_BITS, &f.bits}, {BF_FIELD_LEVELS, &f.levels}, {BF_FIELD_PER_FIELD, &f.per_field},
                           {BF_FIELD_FIELD_BITS, &f.field_bits}, {BF_FIELD_DTYPE, &f.dtype}}) {
    PluginField const* p = find_field(fc, name);
    if (p == nullptr) return op + ": missing field '" + name + "'";
    auto v = ints_of(*p);
    if (!v || v->size() != 1) return op + ": field '" + name + "' must be one integer";
    *out = (*v)[0];
  }
  PluginField const* g = find_field(fc, BF_FIELD_GRID);
  if (g == nullptr) return op + ": missing field '" BF_FIELD_GRID "'";
  if (g->type != PluginFieldType::kCHAR || g->data == nullptr) return op + ": field '" BF_FIELD_GRID "' must be a string";
  f.grid.assign(static_cast<char const*>(g->data), strnlen(static_cast<char const*>(g->data), static_cast<size_t>(g->length)));
  PluginField const* s = find_field(fc, BF_FIELD_SHAPE);
  if (s == nullptr) return op + ": missing field '" BF_FIELD_SHAPE "'";
  auto dims = ints_of(*s);
  if (!dims) return op + ": field '" BF_FIELD_SHAPE "' must be integers";
  f.shape = *dims;
  grid = f.grid;
  return describe(f, desc, shape);
}

}  // namespace

const char* plugin_last_error() {
  std::lock_guard<std::mutex> lock(gMutex);
  return gLastError.c_str();  // valid until the next error; callers copy it
}

void report_error(std::string const& message) {
  std::lock_guard<std::mutex> lock(gMutex);
  gLastError = message;
  ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
  if (logger != nullptr) logger->log(ILogger::Severity::kERROR, message.c_str());
  else std::fprintf(stderr, "[bf plugin] %s\n", message.c_str());
}

void set_logger_finder(ILoggerFinder* finder) {
  std::lock_guard<std::mutex> lock(gMutex);
  if (gLoggerFinder == nullptr) gLoggerFinder = finder;
}

// ---------------------------------------------------------------------------------------------
LowBitDequantPlugin::LowBitDequantPlugin(bf_decode_desc desc, std::vector<int32_t> shape, std::string grid)
    : mDesc(desc), mShape(std::move(shape)), mGrid(std::move(grid)) {
  mCodesBytes = packed_bytes(mDesc);
}

IPluginCapability* LowBitDequantPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

IPluginV3* LowBitDequantPlugin::clone() noexcept {
  try {
    return new LowBitDequantPlugin(mDesc, mShape, mGrid);
  } catch (std::exception const& e) {
    report_error(std::string(BF_OP_NAME ": clone failed: ") + e.what());
    return nullptr;
  }
}

char const* LowBitDequantPlugin::getPluginName() const noexcept { return BF_OP_NAME; }
char const* LowBitDequantPlugin::getPluginVersion() const noexcept { return BF_OP_VERSION; }
char const* LowBitDequantPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }

bool LowBitDequantPlugin::checkInputs(Dims const& codes, Dims const& scale) const {
  if (codes.nbDims != 1 || codes.d[0] != mCodesBytes) {
    report_error(std::string(BF_OP_NAME ": codes must be a 1-D buffer of ") + std::to_string(mCodesBytes) + " bytes");
    return false;
  }
  if (scale.nbDims != 1 || scale.d[0] != mDesc.rows) {
    report_error(std::string(BF_OP_NAME ": scale must be 1-D with ") + std::to_string(mDesc.rows) + " values");
    return false;
  }
  return true;
}

int32_t LowBitDequantPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                                             int32_t nbOutputs) noexcept {
  if (in == nullptr || nbInputs != 2 || nbOutputs != 1) return -1;
  return checkInputs(in[0].desc.dims, in[1].desc.dims) ? 0 : -1;
}

int32_t LowBitDequantPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const*, int32_t nbInputs) const noexcept {
  if (outputTypes == nullptr || nbOutputs != 1 || nbInputs != 2) return -1;
  outputTypes[0] = trt_type(mDesc.out_dtype);
  return 0;
}

int32_t LowBitDequantPlugin::getOutputShapes(DimsExprs const*, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                                             int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept {
  if (outputs == nullptr || nbInputs != 2 || nbOutputs != 1) return -1;
  outputs[0].nbDims = static_cast<int32_t>(mShape.size());
  for (size_t i = 0; i < mShape.size(); ++i) {
    outputs[0].d[i] = exprBuilder.constant(mShape[i]);
    if (outputs[0].d[i] == nullptr) return -1;
  }
  return 0;
}

bool LowBitDequantPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                                    int32_t nbOutputs) noexcept {
  if (inOut == nullptr || nbInputs != 2 || nbOutputs != 1 || pos < 0 || pos > 2) return false;
  PluginTensorDesc const& d = inOut[pos].desc;
  if (d.format != TensorFormat::kLINEAR) return false;
  // The codes are bytes: uint8 as the ONNX op declares them, or int8 holding the same bits. TensorRT-RTX
  // refuses uint8 plugin tensors ("UInt8 datatype formats are not supported") and its ONNX parser turns
  // uint8 initializers into int32 constants, so graphs built for it carry the codes as int8.
  if (pos == 0) return d.type == DataType::kUINT8 || d.type == DataType::kINT8;
  if (pos == 1) return d.type == DataType::kFLOAT || d.type == DataType::kHALF;
  return d.type == trt_type(mDesc.out_dtype);
}

int32_t LowBitDequantPlugin::getNbOutputs() const noexcept { return 1; }

int32_t LowBitDequantPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t nbOutputs) noexcept {
  if (in == nullptr || nbInputs != 2 || nbOutputs != 1) return -1;
  return checkInputs(in[0].dims, in[1].dims) ? 0 : -1;
}

int32_t LowBitDequantPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
                                     void* const* outputs, void*, cudaStream_t stream) noexcept {
  if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr) return -1;
  bf_decode_desc d = mDesc;
  d.scale_dtype = inputDesc[1].type == DataType::kHALF ? BF_DTYPE_FLOAT16 : BF_DTYPE_FLOAT32;
  if (outputDesc[0].type != trt_type(mDesc.out_dtype)) {
    report_error(std::string(BF_OP_NAME ": output must be ") + dtype_name(mDesc.out_dtype));
    return -1;
  }
  int32_t st = bf_decode_cuda(&d, static_cast<uint8_t const*>(inputs[0]), mCodesBytes, inputs[1], outputs[0], stream);
  if (st != BF_OK) {
    report_error(std::string(BF_OP_NAME ": ") + bf_status_string(st));
    return -1;
  }
  return 0;
}

IPluginV3* LowBitDequantPlugin::attachToContext(IPluginResourceContext*) noexcept { return clone(); }

PluginFieldCollection const* LowBitDequantPlugin::getFieldsToSerialize() noexcept {
  // Points into this object's members, which outlive the call as TensorRT requires.
  mFields = {
      PluginField(BF_FIELD_BITS, &mDesc.bits, PluginFieldType::kINT32, 1),
      PluginField(BF_FIELD_GRID, mGrid.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mGrid.size())),
      PluginField(BF_FIELD_LEVELS, &mDesc.levels, PluginFieldType::kINT32, 1),
      PluginField(BF_FIELD_PER_FIELD, &mDesc.per_field, PluginFieldType::kINT32, 1),
      PluginField(BF_FIELD_FIELD_BITS, &mDesc.field_bits, PluginFieldType::kINT32, 1),
      PluginField(BF_FIELD_SHAPE, mShape.data(), PluginFieldType::kINT32, static_cast<int32_t>(mShape.size())),
      PluginField(BF_FIELD_DTYPE, &mDesc.out_dtype, PluginFieldType::kINT32, 1),
  };
  mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
  mFieldCollection.fields = mFields.data();
  return &mFieldCollection;
}

// ---------------------------------------------------------------------------------------------
LowBitDequantCreator::LowBitDequantCreator() {
  mFieldNames = {
      PluginField(BF_FIELD_BITS, nullptr, PluginFieldType::kINT32, 1),
      PluginField(BF_FIELD_GRID, nullptr, PluginFieldType::kCHAR, 0),
      PluginField(BF_FIELD_LEVELS, nullptr, PluginFieldType::kINT32, 1),
      PluginField(BF_FIELD_PER_FIELD, nullptr, PluginFieldType::kINT32, 1),
      PluginField(BF_FIELD_FIELD_BITS, nullptr, PluginFieldType::kINT32, 1),
      PluginField(BF_FIELD_SHAPE, nullptr, PluginFieldType::kINT32, 0),
      PluginField(BF_FIELD_DTYPE, nullptr, PluginFieldType::kINT32, 1),
  };
  mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
  mFieldCollection.fields = mFieldNames.data();
}

IPluginV3* LowBitDequantCreator::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept {
  try {
    bf_decode_desc desc{};
    std::vector<int32_t> shape;
    std::string grid;
    std::string error = parse_fields(fc, desc, shape, grid);
    if (!error.empty()) {
      report_error(std::string(name != nullptr ? name : "?") + ": " + error);
      return nullptr;
    }
    return new LowBitDequantPlugin(desc, std::move(shape), std::move(grid));
  } catch (std::exception const& e) {
    report_error(std::string(BF_OP_NAME ": createPlugin failed: ") + e.what());
    return nullptr;
  }
}

PluginFieldCollection const* LowBitDequantCreator::getFieldNames() noexcept { return &mFieldCollection; }
char const* LowBitDequantCreator::getPluginName() const noexcept { return BF_OP_NAME; }
char const* LowBitDequantCreator::getPluginVersion() const noexcept { return BF_OP_VERSION; }
char const* LowBitDequantCreator::getPluginNamespace() const noexcept { return kPluginNamespace; }

}  // namespace bf

extern "C" BF_API const char* bf_plugin_last_error(void) { return bf::plugin_last_error(); }
extern "C" BF_API int32_t bf_plugin_tensorrt_version(void) { return NV_TENSORRT_MAJOR * 100 + NV_TENSORRT_MINOR; }
