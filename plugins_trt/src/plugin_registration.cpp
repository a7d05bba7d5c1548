// What TensorRT's loaders look for in libbf_trt_plugin.so: a registration when the library is
// loaded (plugins found as soon as it is, e.g. trtexec --staticPlugins or ctypes), and
// getCreators/setLoggerFinder (IPluginRegistry::loadLibrary, polygraphy --plugins, plugins
// serialized into version-compatible engines). Kept out of the harness, which has no libnvinfer.
//
// loadLibrary opens the library (which runs the load-time registration) and then registers what
// getCreators returns; a creator registered twice makes it fail ("Cannot register the library as
// plugin creator of LowBitDequant exists already"), so getCreators takes the load-time
// registration back before handing the creator over.
#include <mutex>

#include "low_bit_dequant_plugin.h"

namespace bf {
namespace {

LowBitDequantCreator& the_creator() {
  static LowBitDequantCreator creator;
  return creator;
}

std::mutex gRegistrationMutex;

struct LoadTimeRegistration {
  bool registered{false};
  LoadTimeRegistration() {
    nvinfer1::IPluginRegistry* registry = getPluginRegistry();
    registered = registry != nullptr && registry->registerCreator(the_creator(), kPluginNamespace);
  }
};
LoadTimeRegistration gLoadTime;

}  // namespace
}  // namespace bf

extern "C" BF_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  {
    std::lock_guard<std::mutex> lock(bf::gRegistrationMutex);
    if (bf::gLoadTime.registered) {
      nvinfer1::IPluginRegistry* registry = getPluginRegistry();
      if (registry != nullptr) registry->deregisterCreator(bf::the_creator());
      bf::gLoadTime.registered = false;
    }
  }
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&bf::the_creator()};
  nbCreators = 1;
  return creators;
}

extern "C" BF_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { bf::set_logger_finder(finder); }
