# Sourced (from the repository root) by the *_gpu.sh wrappers in benchmarks/ and tools/ on a device machine, which has no internet:
# installs the wheels carried in .whl/ (diffusers and what else the image lacks) and bf itself under /tmp,
# where the source tree's bf/ (without the stage packages) cannot shadow them. Nothing installed is ever replaced while
# a process may be importing from it (a run left in the background by an earlier call): the wheels go in once, and bf
# into a directory named by its sources, so a changed tree gets a new one.
if [ -d .whl ]; then
  if [ ! -e /tmp/site/.complete ]; then
    rm -rf /tmp/site.new
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site.new .whl/*.whl \
      && touch /tmp/site.new/.complete && rm -rf /tmp/site && mv /tmp/site.new /tmp/site
  fi
  bf_key=$(find pyproject.toml bf trainer export runtime -type f -not -path '*/__pycache__/*' | sort | xargs cat | sha1sum | cut -c1-12)
  if [ ! -e "/tmp/bfpkg-$bf_key/.complete" ]; then
    rm -rf "/tmp/bfpkg-$bf_key.new"
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "/tmp/bfpkg-$bf_key.new" . \
      && touch "/tmp/bfpkg-$bf_key.new/.complete" && mv "/tmp/bfpkg-$bf_key.new" "/tmp/bfpkg-$bf_key"
  fi
  # the repository last: the GPU tests import their helpers from tests.conftest, while bf resolves to the installed copy
  export PYTHONPATH=/tmp/bfpkg-$bf_key:/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export BF_CACHE=/tmp/bfcache TORCHINDUCTOR_CACHE_DIR=/tmp/bfcache/torchinductor  # exports, engines, inductor's kernels
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# The decode kernels for the GPU here (sm_90), built once into /tmp/bfbuild; BF_DECODE_LIB names the library.
build_decode_library() {
  cmake -S plugins_trt -B /tmp/bfbuild -DBF_CUDA_ARCHITECTURES="90" | grep "bf:"
  cmake --build /tmp/bfbuild -j16 --target bf_decode 2>&1 | grep -E "error|Built target" || true
  export BF_DECODE_LIB=/tmp/bfbuild/libbf_decode.so
}
