# Sourced (from the repository root) by the *_gpu.sh wrappers in benchmarks/ and tools/ on a device machine, which has no internet:
# installs the wheels carried in .whl/ (diffusers and what else the image lacks) and bf itself under /tmp,
# where the source tree's bf/ (without the stage packages) cannot shadow them.
if [ -d .whl ] && ! python3 -c "import diffusers, bf.trainer" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/bfpkg .
  export PYTHONPATH=/tmp/bfpkg:/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# The decode kernels for the GPU here (sm_90), built once into /tmp/bfbuild; BF_DECODE_LIB names the library.
build_decode_library() {
  cmake -S plugins_trt -B /tmp/bfbuild -DBF_CUDA_ARCHITECTURES="90" | grep "bf:"
  cmake --build /tmp/bfbuild -j16 --target bf_decode 2>&1 | grep -E "error|Built target" || true
  export BF_DECODE_LIB=/tmp/bfbuild/libbf_decode.so
}
