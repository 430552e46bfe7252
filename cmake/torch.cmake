# LibTorch from the pinned torch wheel (scripts/install-deps.sh puts it in a
# virtual environment outside the repo). A plain `cmake -S . -B build` finds
# it: the environment's default place is searched without any flag.
#   -DZEROQ_VENV=DIR (or the environment variable) names another environment;
#   -DZEROQ_TORCH_ROOT=DIR names any LibTorch folder with lib/ and include/
#   (site-packages/torch, or an unpacked LibTorch archive).
#
# The project imports LibTorch's CPU library itself rather than through
# TorchConfig.cmake: that file insists on a CUDA toolkit (nvcc) at configure
# time for a CUDA-enabled LibTorch, which nothing here compiles with (there
# is no .cu file), and it would link the CUDA half into every binary.
#
# What this defines:
#   ZEROQ_VENV             the environment (its bin/python is the tests' Python)
#   zeroq::torch_cpu       LibTorch without CUDA: what everything links (C++20,
#                          as LibTorch 2.15's headers need). The CUDA half
#                          (libtorch_cuda.so and the wheel's CUDA libraries)
#                          is loaded only by a process that uses a CUDA device
#                          (core/cuda_runtime.h).
#   ZEROQ_TORCH_VERSION    e.g. 2.15.0
#   ZEROQ_TORCH_HAS_CUDA   whether libtorch_cuda.so sits beside libtorch_cpu.so

if(DEFINED ENV{ZEROQ_VENV} AND NOT ZEROQ_VENV)
  set(ZEROQ_VENV "$ENV{ZEROQ_VENV}")
endif()
if(NOT ZEROQ_VENV)
  if(DEFINED ENV{XDG_DATA_HOME})
    set(ZEROQ_VENV "$ENV{XDG_DATA_HOME}/zeroq/venv-torch-2.15.0")
  else()
    set(ZEROQ_VENV "$ENV{HOME}/.local/share/zeroq/venv-torch-2.15.0")
  endif()
endif()
set(ZEROQ_VENV "${ZEROQ_VENV}" CACHE PATH "Virtual environment with the torch wheel")

if(NOT ZEROQ_TORCH_ROOT)
  file(GLOB _zeroq_torch_roots "${ZEROQ_VENV}/lib/python3*/site-packages/torch")
  list(GET _zeroq_torch_roots 0 _zeroq_torch_root)
  set(ZEROQ_TORCH_ROOT "${_zeroq_torch_root}")
endif()
set(ZEROQ_TORCH_ROOT "${ZEROQ_TORCH_ROOT}" CACHE PATH "LibTorch folder (lib/, include/)")

find_library(ZEROQ_TORCH_CPU_LIB torch_cpu PATHS "${ZEROQ_TORCH_ROOT}/lib" NO_DEFAULT_PATH)
find_library(ZEROQ_C10_LIB c10 PATHS "${ZEROQ_TORCH_ROOT}/lib" NO_DEFAULT_PATH)
set(_zeroq_version_h "${ZEROQ_TORCH_ROOT}/include/torch/headeronly/version.h")
if(NOT EXISTS "${_zeroq_version_h}")
  set(_zeroq_version_h "${ZEROQ_TORCH_ROOT}/include/torch/csrc/api/include/torch/version.h")
endif()
if(NOT ZEROQ_TORCH_CPU_LIB OR NOT ZEROQ_C10_LIB OR NOT EXISTS "${_zeroq_version_h}")
  message(FATAL_ERROR
    "LibTorch not found (looked in \"${ZEROQ_TORCH_ROOT}\"). Run "
    "scripts/install-deps.sh, which installs the pinned torch wheel into "
    "${ZEROQ_VENV}, or pass -DZEROQ_VENV=DIR or -DZEROQ_TORCH_ROOT=DIR.")
endif()
set(ZEROQ_TORCH_VERSION "")
foreach(_part MAJOR MINOR PATCH)
  file(STRINGS "${_zeroq_version_h}" _line REGEX "define TORCH_VERSION_${_part} ")
  string(REGEX REPLACE ".*TORCH_VERSION_${_part} ([0-9]+).*" "\\1" _num "${_line}")
  string(APPEND ZEROQ_TORCH_VERSION "${_num}.")
endforeach()
string(REGEX REPLACE "\\.$" "" ZEROQ_TORCH_VERSION "${ZEROQ_TORCH_VERSION}")
if(ZEROQ_TORCH_VERSION VERSION_LESS 2.15)
  message(WARNING "LibTorch ${ZEROQ_TORCH_VERSION} in ${ZEROQ_TORCH_ROOT}; the project "
                  "is built and tested with 2.15 (scripts/install-deps.sh)")
endif()
if(EXISTS "${ZEROQ_TORCH_ROOT}/lib/libtorch_cuda.so")
  set(ZEROQ_TORCH_HAS_CUDA ON)
else()
  set(ZEROQ_TORCH_HAS_CUDA OFF)
endif()
message(STATUS "LibTorch ${ZEROQ_TORCH_VERSION} in ${ZEROQ_TORCH_ROOT} (CUDA half: ${ZEROQ_TORCH_HAS_CUDA})")

add_library(zeroq_torch_cpu INTERFACE)
target_link_libraries(zeroq_torch_cpu INTERFACE ${ZEROQ_TORCH_CPU_LIB} ${ZEROQ_C10_LIB})
# System headers: LibTorch's own warnings are not ours.
target_include_directories(zeroq_torch_cpu SYSTEM INTERFACE
  "${ZEROQ_TORCH_ROOT}/include"
  "${ZEROQ_TORCH_ROOT}/include/torch/csrc/api/include")
target_compile_features(zeroq_torch_cpu INTERFACE cxx_std_20)
add_library(zeroq::torch_cpu ALIAS zeroq_torch_cpu)

# Binaries find torch/lib without LD_LIBRARY_PATH (CMake puts the folder of
# every linked library in the build tree's RPATH); libtorch_cuda.so finds the
# wheel's CUDA libraries through its own RPATH.
