// How the CPU BatchNorm ops hand their tensors to the loops of bn_kernels.h.
#pragma once

#include <ATen/ATen.h>

#include "bn_kernels.h"

namespace resfast::cpu {

// The memory format the loops walk y in: the one y is dense in (channels_last
// or NCHW; when y is both, C == 1 or H*W == 1, the one with the longer
// contiguous runs), else y's suggested format, which costs a copy.
inline at::MemoryFormat loop_format(const at::Tensor& y) {
  const bool rows = y.is_contiguous(at::MemoryFormat::ChannelsLast);
  const bool planes = y.is_contiguous();
  if (rows && planes) {
    return y.size(1) >= y.size(2) * y.size(3) ? at::MemoryFormat::ChannelsLast
                                              : at::MemoryFormat::Contiguous;
  }
  if (rows) return at::MemoryFormat::ChannelsLast;
  if (planes) return at::MemoryFormat::Contiguous;
  return y.suggest_memory_format();
}

inline Geometry geometry(const at::Tensor& y, at::MemoryFormat format) {
  return {y.size(0), y.size(1), y.size(2) * y.size(3),
          format == at::MemoryFormat::ChannelsLast ? Layout::kRows : Layout::kPlanes};
}

// t copied into `format`: by tiles (kernels().transpose_images, which declines
// the tensors its tiles would not speed up) when t is an activation dense in the
// other of the two layouts; else by ATen's copy_.
inline at::Tensor relayout(const at::Tensor& t, at::MemoryFormat format) {
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(format));
  const bool to_rows = format == at::MemoryFormat::ChannelsLast;
  const bool other_layout = t.dim() == 4 && !t.is_conj() && !t.is_neg() &&
                            (to_rows ? t.is_contiguous()
                                     : t.is_contiguous(at::MemoryFormat::ChannelsLast));
  if (other_layout) {
    const int64_t C = t.size(1), HW = t.size(2) * t.size(3);
    if (kernels().transpose_images({t.const_data_ptr(), t.scalar_type(), t.size(0),
                                    to_rows ? C : HW, to_rows ? HW : C,
                                    out.mutable_data_ptr()})) {
      return out;
    }
  }
  return out.copy_(t);
}

// t dense in `format`: t itself when it is (the fast path), else a copy.
inline at::Tensor dense(const at::Tensor& t, at::MemoryFormat format) {
  return t.is_contiguous(format) ? t : relayout(t, format);
}

// The buffer a loop writes `out` through: out itself when it is dense in
// `format`, else a temporary that copy_back() moves into out.
inline at::Tensor buffer_for(const at::Tensor& out, at::MemoryFormat format) {
  return out.is_contiguous(format) ? out
                                   : at::empty(out.sizes(), out.options().memory_format(format));
}
inline void copy_back(at::Tensor& out, const at::Tensor& buffer) {
  if (!buffer.is_same(out)) out.copy_(buffer);
}

// A per-channel vector as the loops read it: contiguous, in dtype `dt` (no
// copy when it already is; a stride-0 or mixed-dtype vector costs C elements).
inline at::Tensor channel_values(const at::Tensor& v, at::ScalarType dt) {
  return v.to(dt).contiguous();
}

inline const void* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}
inline void* mutable_data_or_null(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr() : nullptr;
}

}  // namespace resfast::cpu
