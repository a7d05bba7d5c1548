// The TensorRT IPluginV3 implementing bitsfusion::LowBitDequant (bf/format/dequant_op.py).
// Name, version and field names come from the generated bf_op_contract.h. The namespace is ""
// because TensorRT's ONNX parser looks plugins up by op type, `plugin_version` (default "1")
// and `plugin_namespace` (default ""), ignoring the node's domain.
#ifndef BF_LOW_BIT_DEQUANT_PLUGIN_H
#define BF_LOW_BIT_DEQUANT_PLUGIN_H

#include <NvInferRuntime.h>

#include <string>
#include <vector>

#include "bf_decode.h"

namespace bf {

constexpr char const* kPluginNamespace = BF_PLUGIN_NAMESPACE;

// The last createPlugin / enqueue error in words (also sent to TensorRT's logger when one is known).
const char* plugin_last_error();
void report_error(std::string const& message);
void set_logger_finder(nvinfer1::ILoggerFinder* finder);

class LowBitDequantPlugin final : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime {
 public:
  // shape: the weight's shape; out_dtype: BF_DTYPE_*; grid string from the fields.
  LowBitDequantPlugin(bf_decode_desc desc, std::vector<int32_t> shape, std::string grid);

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs, nvinfer1::DynamicPluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  bf_decode_desc const& desc() const { return mDesc; }

 private:
  bool checkInputs(nvinfer1::Dims const& codes, nvinfer1::Dims const& scale) const;

  bf_decode_desc mDesc;
  std::vector<int32_t> mShape;
  std::string mGrid;
  int64_t mCodesBytes{0};
  // Storage the serialized fields point into.
  std::vector<nvinfer1::PluginField> mFields;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

class LowBitDequantCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  LowBitDequantCreator();
  // Validates every field; on a missing or wrong one returns nullptr and reports which and why.
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

 private:
  std::vector<nvinfer1::PluginField> mFieldNames;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

}  // namespace bf

#endif  // BF_LOW_BIT_DEQUANT_PLUGIN_H
