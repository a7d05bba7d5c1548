// libbf_trt_rtx_alias.so: an empty library whose SONAME is libtensorrt_rtx.so and which depends on
// libtensorrt_rtx.so.1. TensorRT-RTX's ONNX parser, on importing a plugin node, opens
// "libtensorrt_rtx.so" by that unversioned name (dlopen + dlsym of getPrivateApi_INTERNAL); the
// Python wheel ships only libtensorrt_rtx.so.1, so the dlopen fails and the parser calls
// std::terminate. Once this library is loaded, the dynamic loader matches that name against its
// SONAME, and dlsym finds the symbol in its dependency, the real library.
// Loading it is only needed where no file named libtensorrt_rtx.so is on the search path.
