// Input checks shared by the CPU and CUDA kernels. Every message names the tensor and what was
// expected, so a bad call from Python reads like a ValueError rather than a crash.
#pragma once

#include <ATen/ATen.h>

#define CTPO_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")

#define CTPO_CHECK_SAME_SHAPE(x, ref)                                                          \
  TORCH_CHECK((x).sizes() == (ref).sizes(), #x " must have the shape of " #ref " ",           \
              (ref).sizes(), ", got ", (x).sizes())

#define CTPO_CHECK_SAME_DTYPE(x, ref)                                                          \
  TORCH_CHECK((x).scalar_type() == (ref).scalar_type(), #x " must have the dtype of " #ref " (", \
              (ref).scalar_type(), "), got ", (x).scalar_type())

#define CTPO_CHECK_SAME_DEVICE(x, ref)                                                         \
  TORCH_CHECK((x).device() == (ref).device(), #x " must be on the device of " #ref " (",        \
              (ref).device(), "), got ", (x).device())

#define CTPO_CHECK_FLOATING(x)                                                                 \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()),                                           \
              #x " must be a floating tensor (float64/float32/bfloat16/float16), got ",        \
              (x).scalar_type())
