// What TensorRT's loaders look for in libbf_trt_plugin.so: the static registration (plugins
// found as soon as the library is loaded, e.g. trtexec --staticPlugins or ctypes), and
// getCreators/setLoggerFinder (IPluginRegistry::loadLibrary, polygraphy --plugins, plugins
// serialized into version-compatible engines). Kept out of the harness, which has no libnvinfer.
#include "low_bit_dequant_plugin.h"

namespace bf {
REGISTER_TENSORRT_PLUGIN(LowBitDequantCreator);
}  // namespace bf

extern "C" BF_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static bf::LowBitDequantCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}

extern "C" BF_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { bf::set_logger_finder(finder); }
