// Drives the LowBitDequant TensorRT plugin class on a GPU without TensorRT's library: the
// plugin is compiled against the official headers (NVIDIA/TensorRT include/), and everything
// TensorRT would do around it is done here by hand:
//   create through the creator from fields (as the ONNX parser passes them), serialize with
//   getFieldsToSerialize, recreate from a byte copy of those fields in the runtime phase,
//   clone, attachToContext, query output types/shapes (through a stand-in IExprBuilder) and
//   formats, configurePlugin/onShapeChange, and enqueue on real device buffers whose output
//   was poisoned first. Outputs are compared bit for bit with scale * (code + qmin) computed
//   here from the codes the harness packed itself, and with the library's CPU decoder.
// It also checks that each missing or wrong field is refused with a message naming it.
//
//   plugin_harness [--json OUT]      exit status 0 only when every check passes
#include <NvInferRuntime.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "decode_common.h"
#include "low_bit_dequant_plugin.h"

using namespace nvinfer1;

namespace {

int gFailures = 0;
int gChecks = 0;

void check(bool ok, std::string const& what) {
  ++gChecks;
  if (!ok) {
    ++gFailures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

#define CUDA_OK(call)                                                                     \
  do {                                                                                    \
    cudaError_t e_ = (call);                                                              \
    if (e_ != cudaSuccess) {                                                              \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                       \
    }                                                                                     \
  } while (0)

// Stand-ins for TensorRT's expression builder: only constants are needed by this plugin.
class ConstExprImpl : public apiv::VDimensionExpr {
 public:
  explicit ConstExprImpl(int64_t v) : mValue(v) {}
  bool isConstant() const override { return true; }
  int64_t getConstantValue() const override { return mValue; }
  bool isSizeTensor() const override { return false; }

 private:
  int64_t mValue;
};

class ConstExpr : public IDimensionExpr {
 public:
  explicit ConstExpr(int64_t v) : mStore(v) { mImpl = &mStore; }
  ~ConstExpr() noexcept override = default;

 private:
  ConstExprImpl mStore;
};

class BuilderImpl : public apiv::VExprBuilder {
 public:
  IDimensionExpr const* constant(int64_t value) override {
    mExprs.push_back(std::make_unique<ConstExpr>(value));
    return mExprs.back().get();
  }
  IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override { return nullptr; }
  IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override { return nullptr; }

 private:
  std::vector<std::unique_ptr<ConstExpr>> mExprs;
};

class Builder : public IExprBuilder {
 public:
  Builder() { mImpl = &mStore; }
  ~Builder() noexcept override = default;

 private:
  BuilderImpl mStore;
};

struct Packing {
  int levels, per_field, field_bits, qmin;
};

Packing packing_of(int bits, bool plain) {
  if (plain) return {1 << bits, 1, bits, -(1 << (bits - 1))};
  return {bf::kBalanced[bits - 1][0], bf::kBalanced[bits - 1][1], bf::kBalanced[bits - 1][2], -(1 << (bits - 1))};
}

// docs/FORMAT.md section 4, written independently of the decoders.
std::vector<uint8_t> pack(std::vector<int> const& codes, int64_t rows, int64_t row_len, Packing p) {
  int64_t nf = (row_len + p.per_field - 1) / p.per_field;
  int64_t row_bytes = (nf * p.field_bits + 7) / 8;
  int64_t body = rows * row_bytes;
  std::vector<uint8_t> buf(static_cast<size_t>((body + 3) / 4 * 4 + 4), 0);
  for (int64_t o = 0; o < rows; ++o) {
    for (int64_t j = 0; j < nf; ++j) {
      uint64_t value = 0;
      for (int t = p.per_field - 1; t >= 0; --t) {
        int64_t i = j * p.per_field + t;
        value = value * p.levels + (i < row_len ? codes[o * row_len + i] : 0);
      }
      for (int b = 0; b < p.field_bits; ++b) {
        if ((value >> b) & 1u) {
          int64_t bit = o * row_bytes * 8 + j * p.field_bits + b;
          buf[bit / 8] |= uint8_t(1u << (bit % 8));
        }
      }
    }
  }
  return buf;
}

// The fields as TensorRT's ONNX parser hands them over (INT -> kINT32, INTS -> kINT32[], STRING -> kCHAR).
struct Fields {
  int32_t bits, levels, per_field, field_bits, dtype;
  std::string grid;
  std::vector<int32_t> shape;
  std::vector<PluginField> list;
  PluginFieldCollection fc{};

  PluginFieldCollection const* collection(char const* drop = nullptr) {
    list.clear();
    auto add = [&](PluginField f) {
      if (drop == nullptr || std::strcmp(f.name, drop) != 0) list.push_back(f);
    };
    add(PluginField(BF_FIELD_BITS, &bits, PluginFieldType::kINT32, 1));
    add(PluginField(BF_FIELD_GRID, grid.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(grid.size())));
    add(PluginField(BF_FIELD_LEVELS, &levels, PluginFieldType::kINT32, 1));
    add(PluginField(BF_FIELD_PER_FIELD, &per_field, PluginFieldType::kINT32, 1));
    add(PluginField(BF_FIELD_FIELD_BITS, &field_bits, PluginFieldType::kINT32, 1));
    add(PluginField(BF_FIELD_SHAPE, shape.data(), PluginFieldType::kINT32, static_cast<int32_t>(shape.size())));
    add(PluginField(BF_FIELD_DTYPE, &dtype, PluginFieldType::kINT32, 1));
    fc.nbFields = static_cast<int32_t>(list.size());
    fc.fields = list.data();
    return &fc;
  }
};

// What serialization does to fields: their bytes are copied and the originals go away.
struct SerializedFields {
  std::vector<std::string> names;
  std::vector<std::vector<uint8_t>> data;
  std::vector<PluginField> list;
  PluginFieldCollection fc{};

  explicit SerializedFields(PluginFieldCollection const* src) {
    static constexpr int kSize[] = {2, 4, 8, 1, 2, 4, 1, 0, 0, 2, 8, 1, 1, 1};
    for (int32_t i = 0; i < src->nbFields; ++i) {
      PluginField const& f = src->fields[i];
      names.emplace_back(f.name);
      auto const* p = static_cast<uint8_t const*>(f.data);
      data.emplace_back(p, p + size_t(f.length) * size_t(kSize[int(f.type)]));
    }
    for (size_t i = 0; i < names.size(); ++i) {
      list.emplace_back(names[i].c_str(), data[i].data(), src->fields[i].type, src->fields[i].length);
    }
    fc.nbFields = static_cast<int32_t>(list.size());
    fc.fields = list.data();
  }
};

DataType trt_type(int dtype) { return dtype == BF_DTYPE_FLOAT16 ? DataType::kHALF : dtype == BF_DTYPE_BFLOAT16 ? DataType::kBF16 : DataType::kFLOAT; }
size_t dtype_size(int dtype) { return dtype == BF_DTYPE_FLOAT32 ? 4 : 2; }

PluginTensorDesc tensor(std::vector<int64_t> dims, DataType type) {
  PluginTensorDesc d{};
  d.dims.nbDims = static_cast<int32_t>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) d.dims.d[i] = dims[i];
  d.type = type;
  d.format = TensorFormat::kLINEAR;
  d.scale = 1.0f;
  return d;
}

DynamicPluginTensorDesc dynamic(PluginTensorDesc d) {
  DynamicPluginTensorDesc x{};
  x.desc = d;
  x.min = x.max = x.opt = d.dims;
  return x;
}

struct CaseResult {
  int bits;
  bool plain;
  int out_dtype, scale_dtype;
  std::vector<int32_t> shape;
  int64_t mismatches;
};

CaseResult run_case(std::mt19937& rng, int bits, bool plain, int out_dtype, int scale_dtype, std::vector<int32_t> shape) {
  std::string const tag = std::to_string(bits) + "-bit " + (plain ? "plain" : "balanced") + " out " + std::to_string(out_dtype) +
                          " scale " + std::to_string(scale_dtype);
  Packing p = packing_of(bits, plain);
  int64_t rows = shape[0], row_len = 1;
  for (size_t i = 1; i < shape.size(); ++i) row_len *= shape[i];
  std::vector<int> codes(static_cast<size_t>(rows * row_len));
  std::uniform_int_distribution<int> code_dist(0, p.levels - 1);
  for (int& c : codes) c = code_dist(rng);
  std::vector<uint8_t> packed = pack(codes, rows, row_len, p);
  std::normal_distribution<float> scale_dist(0.0f, 0.05f);
  std::vector<float> scale32(static_cast<size_t>(rows));
  std::vector<uint16_t> scale16(static_cast<size_t>(rows));
  for (int64_t o = 0; o < rows; ++o) {
    scale16[o] = bf::f32_to_f16_bits(std::fabs(scale_dist(rng)) + 1e-3f);
    scale32[o] = scale_dtype == BF_DTYPE_FLOAT16 ? bf::f16_bits_to_f32(scale16[o]) : std::fabs(scale_dist(rng)) + 1e-3f;
  }
  void const* scale_host = scale_dtype == BF_DTYPE_FLOAT16 ? static_cast<void const*>(scale16.data()) : scale32.data();

  // Build phase: create from the parser's fields.
  bf::LowBitDequantCreator creator;
  check(std::strcmp(creator.getPluginName(), BF_OP_NAME) == 0 && std::strcmp(creator.getPluginVersion(), BF_OP_VERSION) == 0,
        "creator name/version");
  check(creator.getFieldNames()->nbFields == BF_NUM_FIELDS, "creator lists every field");
  Fields f{bits, p.levels, p.per_field, p.field_bits, out_dtype, plain ? "plain" : "balanced", shape, {}, {}};
  std::unique_ptr<IPluginV3> built(creator.createPlugin("w", f.collection(), TensorRTPhase::kBUILD));
  check(built != nullptr, tag + ": createPlugin from fields");
  if (!built) return {bits, plain, out_dtype, scale_dtype, shape, -1};
  auto* build = static_cast<IPluginV3OneBuild*>(built->getCapabilityInterface(PluginCapabilityType::kBUILD));
  auto* core = static_cast<IPluginV3OneCore*>(built->getCapabilityInterface(PluginCapabilityType::kCORE));
  check(std::strcmp(core->getPluginName(), BF_OP_NAME) == 0 && std::strcmp(core->getPluginNamespace(), "") == 0, "core names");
  check(build->getNbOutputs() == 1, "one output");

  DataType out_type{};
  DataType in_types[2] = {DataType::kUINT8, scale_dtype == BF_DTYPE_FLOAT16 ? DataType::kHALF : DataType::kFLOAT};
  check(build->getOutputDataTypes(&out_type, 1, in_types, 2) == 0 && out_type == trt_type(out_dtype), tag + ": output type");

  Builder exprs;
  DimsExprs in_exprs[2]{}, out_exprs{};
  check(build->getOutputShapes(in_exprs, 2, nullptr, 0, &out_exprs, 1, exprs) == 0, tag + ": getOutputShapes");
  bool shape_ok = out_exprs.nbDims == static_cast<int32_t>(shape.size());
  for (int32_t i = 0; shape_ok && i < out_exprs.nbDims; ++i) {
    shape_ok = out_exprs.d[i]->isConstant() && out_exprs.d[i]->getConstantValue() == shape[i];
  }
  check(shape_ok, tag + ": output shape from the fields");

  int64_t nbytes = static_cast<int64_t>(packed.size());
  PluginTensorDesc io[3] = {tensor({nbytes}, DataType::kUINT8), tensor({rows}, in_types[1]),
                            tensor(std::vector<int64_t>(shape.begin(), shape.end()), trt_type(out_dtype))};
  DynamicPluginTensorDesc dio[3] = {dynamic(io[0]), dynamic(io[1]), dynamic(io[2])};
  for (int pos = 0; pos < 3; ++pos) check(build->supportsFormatCombination(pos, dio, 2, 1), tag + ": accepts its formats");
  DynamicPluginTensorDesc int8_codes[3] = {dio[0], dio[1], dio[2]};
  int8_codes[0].desc.type = DataType::kINT8;
  check(build->supportsFormatCombination(0, int8_codes, 2, 1), tag + ": accepts int8 codes (the same bytes)");
  DynamicPluginTensorDesc wrong[3] = {dio[0], dio[1], dio[2]};
  wrong[0].desc.type = DataType::kINT32;
  wrong[1].desc.type = DataType::kBF16;
  wrong[2].desc.type = out_dtype == BF_DTYPE_FLOAT32 ? DataType::kHALF : DataType::kFLOAT;
  for (int pos = 0; pos < 3; ++pos) check(!build->supportsFormatCombination(pos, wrong, 2, 1), tag + ": refuses wrong types");
  wrong[0] = dio[0];
  wrong[0].desc.format = TensorFormat::kCHW32;
  check(!build->supportsFormatCombination(0, wrong, 2, 1), tag + ": refuses non-linear formats");
  check(build->configurePlugin(dio, 2, dio + 2, 1) == 0, tag + ": configurePlugin");
  DynamicPluginTensorDesc bad_codes[2] = {dynamic(tensor({nbytes + 4}, DataType::kUINT8)), dio[1]};
  check(build->configurePlugin(bad_codes, 2, dio + 2, 1) != 0, tag + ": configurePlugin refuses a wrong codes size");

  // Serialize, then recreate in the runtime phase from a copy of the bytes.
  auto* rt_build = static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  SerializedFields ser(rt_build->getFieldsToSerialize());
  check(ser.fc.nbFields == BF_NUM_FIELDS, tag + ": serializes every field");
  built.reset();  // the fields must not point into the dead plugin
  std::unique_ptr<IPluginV3> restored(creator.createPlugin("w", &ser.fc, TensorRTPhase::kRUNTIME));
  check(restored != nullptr, tag + ": recreate from serialized fields");
  if (!restored) return {bits, plain, out_dtype, scale_dtype, shape, -1};
  std::unique_ptr<IPluginV3> cloned(restored->clone());
  check(cloned != nullptr, tag + ": clone");
  auto* rt0 = static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  std::unique_ptr<IPluginV3> attached(rt0->attachToContext(nullptr));
  auto* rt = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  check(rt->onShapeChange(io, 2, io + 2, 1) == 0, tag + ": onShapeChange");

  // Enqueue on device buffers; the output is poisoned with 0xFF bytes (NaN in every dtype).
  size_t out_bytes = size_t(rows * row_len) * dtype_size(out_dtype);
  size_t scale_bytes = size_t(rows) * (scale_dtype == BF_DTYPE_FLOAT16 ? 2 : 4);
  uint8_t* d_codes;
  void *d_scale, *d_out;
  CUDA_OK(cudaMalloc(&d_codes, packed.size()));
  CUDA_OK(cudaMalloc(&d_scale, scale_bytes));
  CUDA_OK(cudaMalloc(&d_out, out_bytes));
  CUDA_OK(cudaMemcpy(d_codes, packed.data(), packed.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(d_scale, scale_host, scale_bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(d_out, 0xFF, out_bytes));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  void const* inputs[2] = {d_codes, d_scale};
  void* outputs[1] = {d_out};
  check(rt->enqueue(io, io + 2, inputs, outputs, nullptr, stream) == 0, tag + ": enqueue");
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_OK(cudaGetLastError());
  std::vector<uint8_t> got(out_bytes);
  CUDA_OK(cudaMemcpy(got.data(), d_out, out_bytes, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaFree(d_codes));
  CUDA_OK(cudaFree(d_scale));
  CUDA_OK(cudaFree(d_out));
  CUDA_OK(cudaStreamDestroy(stream));

  // Expected: from the codes directly (float32), converted as numpy/ml_dtypes would.
  std::vector<uint8_t> want(out_bytes);
  for (int64_t o = 0; o < rows; ++o) {
    for (int64_t i = 0; i < row_len; ++i) {
      float v = scale32[o] * float(codes[o * row_len + i] + p.qmin);
      size_t k = size_t(o * row_len + i);
      if (out_dtype == BF_DTYPE_FLOAT32) std::memcpy(&want[k * 4], &v, 4);
      else {
        uint16_t h = out_dtype == BF_DTYPE_FLOAT16 ? bf::f32_to_f16_bits(v) : bf::f32_to_bf16_bits(v);
        std::memcpy(&want[k * 2], &h, 2);
      }
    }
  }
  std::vector<uint8_t> cpu(out_bytes);
  bf_decode_desc cd = static_cast<bf::LowBitDequantPlugin*>(attached.get())->desc();
  cd.scale_dtype = scale_dtype;
  check(bf_decode_cpu(&cd, packed.data(), nbytes, scale_host, cpu.data()) == BF_OK && cpu == want, tag + ": CPU decoder agrees");
  int64_t mismatches = 0;
  size_t es = dtype_size(out_dtype);
  for (size_t k = 0; k < out_bytes; k += es) mismatches += std::memcmp(&got[k], &want[k], es) != 0;
  check(mismatches == 0, tag + ": enqueue output equals the reference bit for bit (" + std::to_string(mismatches) + " differ)");
  return {bits, plain, out_dtype, scale_dtype, shape, mismatches};
}

int check_bad_fields() {
  bf::LowBitDequantCreator creator;
  int refused = 0;
  auto expect_refused = [&](Fields& f, char const* drop, char const* needle) {
    std::unique_ptr<IPluginV3> p(creator.createPlugin("bad", f.collection(drop), TensorRTPhase::kBUILD));
    std::string msg = bf::plugin_last_error();
    bool ok = p == nullptr && msg.find(needle) != std::string::npos;
    check(ok, std::string("refused with a message containing '") + needle + "' (got '" + msg + "')");
    refused += ok;
  };
  Packing p = packing_of(2, false);
  auto good = [&] { return Fields{2, p.levels, p.per_field, p.field_bits, BF_DTYPE_FLOAT32, "balanced", {8, 3, 3, 3}, {}, {}}; };
  for (char const* name : {BF_FIELD_BITS, BF_FIELD_GRID, BF_FIELD_LEVELS, BF_FIELD_PER_FIELD, BF_FIELD_FIELD_BITS, BF_FIELD_SHAPE,
                           BF_FIELD_DTYPE}) {
    Fields f = good();
    expect_refused(f, name, (std::string("missing field '") + name + "'").c_str());
  }
  Fields f = good();
  f.bits = 9;
  expect_refused(f, nullptr, "bits 9 is outside 1..8");
  f = good();
  f.grid = "fancy";
  expect_refused(f, nullptr, "grid 'fancy'");
  f = good();
  f.levels = 4;
  expect_refused(f, nullptr, "does not match a 2-bit balanced grid");
  f = good();
  f.dtype = 7;
  expect_refused(f, nullptr, "dtype 7");
  f = good();
  f.shape = {8, 0, 3};
  expect_refused(f, nullptr, "shape has a dimension 0");
  f = good();
  f.shape = {};
  expect_refused(f, nullptr, "must be 1 to 8 integers");
  return refused;
}

}  // namespace

int main(int argc, char** argv) {
  char const* json_path = argc == 3 && std::strcmp(argv[1], "--json") == 0 ? argv[2] : nullptr;
  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
    std::printf("no CUDA device: the harness needs a GPU\n");
    return 2;
  }
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::mt19937 rng(1234);
  std::vector<CaseResult> results;
  // Every width and grid; odd shapes (rows not filling a field, 1-wide rows, 3x3 convs) and one
  // large layer; every output and scale dtype across the set.
  std::vector<std::vector<int32_t>> shapes = {{7, 5}, {3, 1}, {33, 17, 3, 3}, {320, 320, 3, 3}, {1, 1001}, {1280, 1280}};
  int dtypes[3] = {BF_DTYPE_FLOAT32, BF_DTYPE_FLOAT16, BF_DTYPE_BFLOAT16};
  int k = 0;
  for (int bits = 1; bits <= 8; ++bits) {
    for (bool plain : {false, true}) {
      for (auto const& shape : shapes) {
        int out_dtype = dtypes[k % 3], scale_dtype = (k / 3) % 2 ? BF_DTYPE_FLOAT16 : BF_DTYPE_FLOAT32;
        ++k;
        results.push_back(run_case(rng, bits, plain, BF_DTYPE_FLOAT32, BF_DTYPE_FLOAT32, shape));
        results.push_back(run_case(rng, bits, plain, out_dtype, scale_dtype, shape));
      }
    }
  }
  int refused = check_bad_fields();
  std::printf("plugin harness on %s (sm_%d%d): %zu decode cases, %d bad-field cases refused, %d checks, %d failures\n", prop.name,
              prop.major, prop.minor, results.size(), refused, gChecks, gFailures);
  if (json_path != nullptr) {
    FILE* f = std::fopen(json_path, "w");
    if (f != nullptr) {
      std::fprintf(f, "{\"gpu\": \"%s\", \"compute_capability\": \"%d.%d\", \"tensorrt_headers\": \"%d.%d.%d\", \"checks\": %d, \"failures\": %d,",
                   prop.name, prop.major, prop.minor, NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR, NV_TENSORRT_PATCH, gChecks, gFailures);
      std::fprintf(f, " \"bad_fields_refused\": %d, \"cases\": [", refused);
      for (size_t i = 0; i < results.size(); ++i) {
        auto const& r = results[i];
        std::string shape;
        for (size_t d = 0; d < r.shape.size(); ++d) shape += (d ? "," : "") + std::to_string(r.shape[d]);
        std::fprintf(f, "%s{\"bits\": %d, \"grid\": \"%s\", \"out_dtype\": %d, \"scale_dtype\": %d, \"shape\": [%s], \"mismatches\": %lld}",
                     i ? ", " : "", r.bits, r.plain ? "plain" : "balanced", r.out_dtype, r.scale_dtype, shape.c_str(),
                     static_cast<long long>(r.mismatches));
      }
      std::fprintf(f, "]}\n");
      std::fclose(f);
    }
  }
  return gFailures == 0 ? 0 : 1;
}
