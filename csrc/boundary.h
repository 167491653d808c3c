// The checked Python -> C++ boundary of ul_fast._C. A tensor crosses as a View (address, element count,
// dtype code, device), which Python passes as the tuple (data, numel, dtype, device) built in one place,
// ul_fast/kernels/extension_ops.py (_view); a tuple is a fraction of the cost of a bound object, and these
// calls are host-bound. Every binding takes Views and sizes as keyword arguments and checks each View's
// dtype, length, device and alignment here before a kernel sees a raw pointer. Plain C++ only (no torch
// headers), so the module does not depend on torch's C++ ABI.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "common.h"

namespace ul_fast {

struct View {
  uintptr_t data = 0;  // address of element 0 (torch's data_ptr())
  int64_t numel = 0;   // number of contiguous elements
  int dtype = -1;      // DType code
  int device = -1;     // -1: host memory; k >= 0: CUDA device k
};

inline const char* dtype_name(int dtype) {
  switch (dtype) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kInt64: return "int64";
    case kInt32: return "int32";
    default: return nullptr;
  }
}

inline int64_t element_size(int dtype) {
  switch (dtype) {
    case kFloat32: case kInt32: return 4;
    case kFloat16: case kBFloat16: return 2;
    case kInt64: return 8;
    default: return 0;
  }
}

inline std::string device_name(int device) {
  return device < 0 ? std::string("cpu") : "cuda:" + std::to_string(device);
}

// The element types each kind of argument may have.
constexpr std::initializer_list<int> kFloatTypes = {kFloat32, kFloat16, kBFloat16};
constexpr std::initializer_list<int> kFp32 = {kFloat32};
constexpr std::initializer_list<int> kInt64Only = {kInt64};

// Checks the Views of one call against each other and against the sizes the kernel will read. Errors are
// std::invalid_argument (ValueError in Python) and name the op and the argument.
class Boundary {
 public:
  // `anchor` (named `anchor_name`) fixes the device every other View must be on.
  Boundary(const char* op, const char* anchor_name, const View& anchor)
      : op_(op), anchor_name_(anchor_name), device_(anchor.device) {}

  int device() const { return device_; }
  bool on_cuda() const { return device_ >= 0; }

  [[noreturn]] void fail(const std::string& message) const {
    throw std::invalid_argument("ul_fast._C." + std::string(op_) + ": " + message);
  }

  // The address of `view` after checking that it holds exactly `numel` elements of one of `dtypes`, lies on
  // the anchor's device and is aligned to its element size (a null address only when empty).
  void* address(const char* name, const View& view, int64_t numel, std::initializer_list<int> dtypes) const {
    bool allowed = false;
    std::string names;
    for (int dtype : dtypes) {
      allowed = allowed || view.dtype == dtype;
      names += (names.empty() ? "" : " or ") + std::string(dtype_name(dtype));
    }
    if (!allowed) {
      const char* got = dtype_name(view.dtype);
      fail(std::string(name) + " must be " + names + ", got dtype code " + std::to_string(view.dtype) +
           (got ? std::string(" (") + got + ")" : std::string(" (unknown)")));
    }
    if (view.numel != numel) {
      fail(std::string(name) + " must hold " + std::to_string(numel) + " elements, got " +
           std::to_string(view.numel));
    }
    if (view.device != device_) {
      fail(std::string(name) + " is on " + device_name(view.device) + " but " + anchor_name_ + " is on " +
           device_name(device_));
    }
    const int64_t size = element_size(view.dtype);
    if (numel > 0 && (view.data == 0 || view.data % size != 0)) {
      fail(std::string(name) + ": address " + std::to_string(view.data) + " is not a valid " +
           std::to_string(size) + "-byte aligned " + dtype_name(view.dtype) + " address");
    }
    return reinterpret_cast<void*>(view.data);
  }

  template <typename T>
  T* typed(const char* name, const View& view, int64_t numel, std::initializer_list<int> dtypes) const {
    return static_cast<T*>(address(name, view, numel, dtypes));
  }

  // `batch` examples of `numel / batch` elements each (a batch of 0 holds nothing).
  void check_batch(int64_t numel, int64_t batch) const {
    if (batch < 0 || (batch == 0 && numel != 0) || (batch > 0 && numel % batch != 0)) {
      fail("batch " + std::to_string(batch) + " does not divide the " + std::to_string(numel) +
           " elements of " + anchor_name_);
    }
  }

 private:
  const char* op_;
  const char* anchor_name_;
  int device_;
};

}  // namespace ul_fast
