// resfast::conv2d_bn_eval: the forward of a CPU eval-mode layer, conv + BN [+ residual]
// [+ ReLU], in one call from Python, with its folded weights cached here.
//
// The Python route (resfast.functional.conv_bn_pending -> resfast.ops.eager.conv2d_bn ->
// resfast.ops.conv_cpu.forward) spends ~250 us of host time around a layer's oneDNN call:
// checks, the choice of route, BN's scale and shift made by bn_finalize on every call, and
// the fold cache's three torch.equal comparisons. Small layers are all host time: ResNet-20's
// inference at batch 1 took 8.0 ms against torch.nn's 4.3 ms (benchmarks/cpu_host_time.py,
// results/2026-12-01-cpu-2core-avx2-host-time.txt). This kernel makes conv_cpu.forward's
// calls for an eval layer (an epilogue, no prologue, no statistics) from C++, and keeps its
// cache entries here: a hit costs the weight's identity and a memcmp of the BN's vectors
// against the copies kept when it was folded. BN's scale and shift are computed only when
// it folds. Same calls, same order: the results equal the Python route's bitwise
// (tests/ops/test_conv2d_bn_eval.py).
//
// It is inference only (its Autograd kernel is the not-implemented fallback): the Python
// route calls it where autograd records nothing (resfast.ops.eager.takes_eval_call).
#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <functional>
#include <mutex>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "conv_layout.h"
#include "conv_ops.h"
#include "op_handle.h"
#include "winograd.h"

namespace resfast::cpu {
namespace {

using Scalars = c10::List<std::optional<c10::Scalar>>;
constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

// resfast.ops.conv_cpu's NCHW_GEMM_MIN_PIXELS and NCHW_GEMM_MIN_BATCH (why: there); the two
// routes are compared bitwise on both sides of each.
constexpr int64_t kNchwGemmMinPixels = 256;
constexpr int64_t kNchwGemmMinBatch = 8;

// conv_cpu.forward's branches for an eval layer, in its order.
enum class Route {
  kWinograd,  // F(4x4, 3x3) on the transformed weight; an NCHW a is copied to CL and back
  kNchwGemm,  // NCHW float32 1x1, stride 1: one GEMM per image, then one bn_act pass
  kNchwAten,  // NCHW float32: ATen's convolution, then one bn_act pass
  kScaled,    // CL float32, no residual: (conv(a, w) + b') * scale, one oneDNN call
  kFolded,    // otherwise: BN folded into the weights, + residual, ReLU: one oneDNN call
};

Route route_of(const at::Tensor& a, const at::Tensor& weight, int64_t stride, int64_t padding,
               int64_t dilation, bool residual) {
  if (winograd_in_inference() && winograd_fits(a, weight, stride, padding, dilation)) {
    return Route::kWinograd;
  }
  const bool f32 = weight.scalar_type() == at::kFloat;
  if (f32 && layout_of(a) != kChannelsLast) {
    const bool gemm = weight.size(2) == 1 && weight.size(3) == 1 && stride == 1 &&
                      padding == 0 && a.size(0) >= kNchwGemmMinBatch &&
                      a.size(2) * a.size(3) >= kNchwGemmMinPixels;
    return gemm ? Route::kNchwGemm : Route::kNchwAten;
  }
  return f32 && !residual ? Route::kScaled : Route::kFolded;
}

// What a cache entry was made for besides the weight and the BN: the route and, for a weight
// packed for oneDNN, the problem it was packed for (conv_cpu.forward's `target`; the other
// routes' folds do not depend on it).
struct Target {
  Route route;
  int64_t stride, padding, dilation;
  std::vector<int64_t> input;
  at::MemoryFormat format;

  bool operator==(const Target& o) const {
    return route == o.route && stride == o.stride && padding == o.padding &&
           dilation == o.dilation && input == o.input && format == o.format;
  }
};

// The values the fold depends on besides the weight: the conv's bias, BN's weight, bias,
// running mean and running variance (undefined where absent), and eps.
struct BatchNormValues {
  std::array<at::Tensor, 5> vectors;
  double eps;
};

bool same_vector(const at::Tensor& kept, const at::Tensor& now) {
  if (!kept.defined() || !now.defined()) return kept.defined() == now.defined();
  if (kept.scalar_type() != now.scalar_type() || kept.sizes() != now.sizes()) return false;
  if (!now.is_contiguous()) return at::equal(kept, now);
  return std::memcmp(kept.const_data_ptr(), now.const_data_ptr(), now.nbytes()) == 0;
}

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Entry {
  WeakImpl weight;  // the entry is void once its weight has died
  int64_t version;
  const void* data;
  at::ScalarType dtype;
  std::vector<int64_t> sizes, strides;
  BatchNormValues values;  // copies
  Target target;
  std::vector<at::Tensor> folded;

  bool matches(const at::Tensor& w, const BatchNormValues& v, const Target& t) const {
    if (weight.expired() || version != w._version() || data != w.const_data_ptr() ||
        dtype != w.scalar_type() || sizes != w.sizes() || strides != w.strides() ||
        !(target == t) || values.eps != v.eps) {
      return false;
    }
    for (size_t i = 0; i < v.vectors.size(); ++i) {
      if (!same_vector(values.vectors[i], v.vectors[i])) return false;
    }
    return true;
  }
};

// The fold cache of the eval layers called through this op, with resfast.ops.fold's rules
// (its module docstring): one entry per weight, reused while the weight (its identity, data
// pointer, version counter, dtype, shape, strides), the BN's values and the target are
// unchanged; inference tensors (no version counter) are folded on every call. An entry
// holds its weight weakly; those of dead weights (and their folded tensors) are dropped at
// every fold and every kSweepPeriod-th call (fold's entries die with their weights at once:
// a Python finalizer; C++ has no callback for a tensor's death).
constexpr int64_t kSweepPeriod = 64;

class FoldCache {
 public:
  std::vector<at::Tensor> get(const at::Tensor& weight, const BatchNormValues& values,
                              const Target& target,
                              const std::function<std::vector<at::Tensor>()>& compute) {
    if (weight.is_inference()) return compute();
    const c10::TensorImpl* key = weight.unsafeGetTensorImpl();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (++calls_ % kSweepPeriod == 0) drop_dead();
      const auto found = entries_.find(key);
      if (found != entries_.end() && found->second.matches(weight, values, target)) {
        ++hits_;
        return found->second.folded;
      }
      ++misses_;
    }
    Entry entry{WeakImpl(weight.getIntrusivePtr()),
                weight._version(),
                weight.const_data_ptr(),
                weight.scalar_type(),
                weight.sizes().vec(),
                weight.strides().vec(),
                {{}, values.eps},
                target,
                {}};
    for (size_t i = 0; i < values.vectors.size(); ++i) {
      if (values.vectors[i].defined()) entry.values.vectors[i] = values.vectors[i].clone();
    }
    {
      at::NoGradGuard no_grad;
      entry.folded = compute();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    drop_dead();
    entries_.insert_or_assign(key, entry);
    return entry.folded;
  }

  // {hits, misses, entries held (dead weights' included until a sweep)}; clear: drop every
  // entry first.
  std::vector<int64_t> info(bool clear) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (clear) entries_.clear();
    return {hits_, misses_, static_cast<int64_t>(entries_.size())};
  }

 private:
  void drop_dead() {
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = it->second.weight.expired() ? entries_.erase(it) : std::next(it);
    }
  }

  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
  int64_t hits_ = 0, misses_ = 0, calls_ = 0;
};

FoldCache& fold_cache() {
  static FoldCache cache;
  return cache;
}

// ---- the fold (conv_cpu's and fold's helpers, the same ATen calls) ------------------------

struct Affine {
  at::Tensor scale, shift, centre;
};

// BN from its running statistics as (v - centre) * scale + shift, in float32 (the statistics
// dtype of a float32 or bfloat16 activation): resfast.functional._running_scale_shift.
Affine running_affine(const at::Tensor& running_mean, const at::Tensor& running_var,
                      const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
                      double eps) {
  static const auto finalize = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
      double)>("resfast::bn_finalize");
  const at::Tensor var = running_var.to(at::kFloat);
  auto [scale, shift] = finalize.call(at::zeros_like(var), var, bn_weight, bn_bias, eps);
  return {scale, shift, running_mean.to(at::kFloat)};
}

// resfast.ops.fold.folded_bias: (bias - centre) * scale + shift in dtype.
at::Tensor folded_bias(const OptionalTensor& bias, const Affine& bn, at::ScalarType dtype) {
  const at::Tensor s = bn.scale.to(dtype);
  at::Tensor b = bias.has_value() ? bias->to(dtype) : at::zeros_like(s);
  b = b - bn.centre.to(dtype);
  return b * s + bn.shift.to(dtype);
}

// The weight in oneDNN's blocked format for this problem (conv_cpu._pack, channels_last).
at::Tensor pack(const at::Tensor& w, const Target& t) {
  static const auto reorder = op_handle<at::Tensor(const at::Tensor&, c10::IntArrayRef,
                                                   c10::IntArrayRef, c10::IntArrayRef, int64_t,
                                                   at::OptionalIntArrayRef)>(
      "mkldnn::_reorder_convolution_weight");
  return reorder.call(w.contiguous(), {t.padding, t.padding}, {t.stride, t.stride},
                      {t.dilation, t.dilation}, 1, t.input);
}

// conv_cpu._scaled_epilogue: {packed weight, b', scale as (1, C, 1, 1) channels_last}.
std::vector<at::Tensor> scaled_epilogue(const at::Tensor& weight, const OptionalTensor& bias,
                                        const Affine& bn, const Target& t) {
  const auto dt = at::kDouble;
  const at::Tensor s0 = bn.scale.to(dt);
  at::Tensor base = -bn.centre.to(dt);
  if (bias.has_value()) base = base + bias->to(dt);
  at::Tensor b1 = base + bn.shift.to(dt) / s0;
  const at::Tensor keep = at::isfinite(b1) & (s0 != 0);
  at::Tensor w = weight, s = s0;
  if (!keep.all().item<bool>()) {
    const at::Tensor folded = (weight.to(dt) * s0.view({-1, 1, 1, 1})).to(weight.scalar_type());
    w = at::where(keep.view({-1, 1, 1, 1}), weight, folded);
    b1 = at::where(keep, b1, base * s0 + bn.shift.to(dt));
    s = at::where(keep, s0, at::ones_like(s0));
  }
  const at::Tensor mul = s.to(weight.scalar_type()).view({1, -1, 1, 1}).contiguous(kChannelsLast);
  return {pack(w, t), b1.to(weight.scalar_type()), mul};
}

// resfast.ops.fold.fold_now, then packed: {weight * scale, bias'} in the weight's dtype.
std::vector<at::Tensor> folded_weight(const at::Tensor& weight, const OptionalTensor& bias,
                                      const Affine& bn, const Target& t) {
  const auto dt = at::kFloat;
  const at::Tensor w =
      (weight.to(dt) * bn.scale.to(dt).view({-1, 1, 1, 1})).to(weight.scalar_type());
  const at::Tensor b = folded_bias(bias, bn, dt).to(weight.scalar_type());
  return {t.format == kChannelsLast ? pack(w, t) : w.contiguous(), b};
}

std::vector<at::Tensor> fold(const at::Tensor& weight, const OptionalTensor& bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var,
                             const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
                             double eps, const Target& t) {
  Affine bn = running_affine(running_mean, running_var, bn_weight, bn_bias, eps);
  switch (t.route) {
    case Route::kWinograd: {  // resfast.ops.winograd.conv's entry
      static const auto transform =
          op_handle<at::Tensor(const at::Tensor&, bool)>("resfast::winograd_weight");
      return {transform.call(weight, false), bn.scale.to(at::kFloat),
              folded_bias(bias, bn, at::kDouble).to(at::kFloat)};
    }
    case Route::kNchwGemm:  // the bias joins the centre: conv + bias - centre
      if (bias.has_value()) bn.centre = bn.centre - *bias;
      return {bn.scale, bn.shift, bn.centre};
    case Route::kNchwAten:
      return {bn.scale, bn.shift, bn.centre};
    case Route::kScaled:
      return scaled_epilogue(weight, bias, bn, t);
    case Route::kFolded:
      return folded_weight(weight, bias, bn, t);
  }
  TORCH_CHECK(false, "conv2d_bn_eval: unknown route");
}

// ---- the convolutions ---------------------------------------------------------------------

// [relu](conv(a, w) + b <binary> other) in one oneDNN call: "mul" (a per-channel scale) or
// "add" (a residual).
at::Tensor onednn_conv_binary(const at::Tensor& a, const at::Tensor& other, const at::Tensor& w,
                              const OptionalTensor& b, const Target& t,
                              std::string_view binary, std::optional<c10::Scalar> alpha,
                              bool relu) {
  static const auto op = op_handle<at::Tensor(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
      c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, std::string_view,
      std::optional<c10::Scalar>, std::optional<std::string_view>, Scalars,
      std::optional<std::string_view>)>("mkldnn::_convolution_pointwise", "binary");
  return op.call(a, other, w, b, {t.padding, t.padding}, {t.stride, t.stride},
                 {t.dilation, t.dilation}, 1, binary, alpha,
                 relu ? std::optional<std::string_view>("relu") : std::nullopt, Scalars(),
                 std::nullopt);
}

// conv_cpu._conv on the folded weight: [relu](conv(a, w) + b [+ residual]).
at::Tensor folded_conv(const at::Tensor& a, const std::vector<at::Tensor>& folded,
                       const OptionalTensor& residual, bool relu, const Target& t) {
  const at::Tensor &w = folded[0], &b = folded[1];
  if (!residual.has_value()) {
    return onednn_conv(a, w, b, t.stride, t.padding, t.dilation, relu ? "relu" : "none");
  }
  if (layout_of(a) != kChannelsLast && a.scalar_type() != at::kFloat) {
    // NCHW bfloat16 has no fused add in ATen: the add and ReLU as one pass of their own
    const at::Tensor y = onednn_conv(a, w, b, t.stride, t.padding, t.dilation, "none");
    return bn_act(y, std::nullopt, std::nullopt, residual->to(y.scalar_type()), relu,
                  std::nullopt);
  }
  return onednn_conv_binary(a, to_memory_format(*residual, layout_of(a)), w, b, t, "add", 1.0,
                            relu);
}

void check_vector(const OptionalTensor& t, const char* name, int64_t channels) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, name, " must have shape (",
                    channels, ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->device().is_cpu(), name, " is on ", t->device(), " but x is on the CPU");
  TORCH_CHECK_VALUE(t->is_floating_point(), name, " must be floating point, got ",
                    t->scalar_type());
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                  const at::Tensor& running_mean, const at::Tensor& running_var,
                  const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
                  const OptionalTensor& residual, int64_t stride, int64_t padding,
                  int64_t dilation) {
  check_conv_tensors("conv2d_bn_eval", x, weight);
  const int64_t channels = weight.size(0);
  check_vector(bias, "bias", channels);
  check_vector(running_mean, "running_mean", channels);
  check_vector(running_var, "running_var", channels);
  check_vector(bn_weight, "bn_weight", channels);
  check_vector(bn_bias, "bn_bias", channels);
  check_conv_geometry(x, weight, stride, padding, dilation);
  if (residual.has_value()) {
    const auto out_shape = conv_output_shape(x, weight, stride, padding, dilation);
    TORCH_CHECK_VALUE(residual->sizes() == out_shape, "residual must have the output's shape ",
                      out_shape, ", got ", residual->sizes());
    TORCH_CHECK_VALUE(residual->device().is_cpu(), "residual is on ", residual->device(),
                      " but x is on the CPU");
    TORCH_CHECK_VALUE(residual->scalar_type() == weight.scalar_type(),
                      "residual must have the output's dtype ", weight.scalar_type(), ", got ",
                      residual->scalar_type());
  }
}

at::Tensor conv2d_bn_eval_cpu(const at::Tensor& x, const at::Tensor& weight,
                              const OptionalTensor& bias, const at::Tensor& running_mean,
                              const at::Tensor& running_var, const OptionalTensor& bn_weight,
                              const OptionalTensor& bn_bias, double eps,
                              const OptionalTensor& residual, bool relu, int64_t stride,
                              int64_t padding, int64_t dilation) {
  check_inputs(x, weight, bias, running_mean, running_var, bn_weight, bn_bias, residual, stride,
               padding, dilation);
  const auto dtype = weight.scalar_type();
  const at::Tensor a = gemm_input(x, dtype);
  const at::MemoryFormat format = layout_of(a);
  OptionalTensor r = residual;
  const Route route = route_of(a, weight, stride, padding, dilation, r.has_value());
  const bool packed = route == Route::kScaled || route == Route::kFolded;
  const Target target{route,
                      stride,
                      padding,
                      dilation,
                      packed ? a.sizes().vec() : std::vector<int64_t>(),
                      packed ? format : at::MemoryFormat::Preserve};
  const BatchNormValues values{{bias.value_or(at::Tensor()), bn_weight.value_or(at::Tensor()),
                                bn_bias.value_or(at::Tensor()), running_mean, running_var},
                               eps};
  const std::vector<at::Tensor> folded = fold_cache().get(weight, values, target, [&] {
    return fold(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps, target);
  });
  switch (target.route) {
    case Route::kWinograd: {
      OptionalTensor r_cl;
      if (r.has_value()) r_cl = to_memory_format(*r, kChannelsLast).to(at::kFloat);
      const at::Tensor y = conv2d_winograd(to_memory_format(a, kChannelsLast), folded[0],
                                           folded[1], folded[2], r_cl, relu);
      return to_memory_format(y, format);
    }
    case Route::kNchwGemm:
    case Route::kNchwAten: {
      at::Tensor y;
      if (target.route == Route::kNchwGemm) {
        // one GEMM per image (conv_cpu._nchw_1x1); detached: matmul picks its kernel by
        // requires_grad too
        const int64_t n = a.size(0), c = a.size(1), h = a.size(2), w = a.size(3);
        y = at::matmul(weight.detach().reshape({weight.size(0), c}),
                       a.detach().reshape({n, c, h * w}))
                .view({n, weight.size(0), h, w});
      } else {
        y = at::convolution(a, gemm_weight(weight, a), bias, {stride, stride},
                            {padding, padding}, {dilation, dilation}, false, {0, 0}, 1);
      }
      if (r.has_value()) r = to_memory_format(*r, layout_of(y));
      return bn_act(y, folded[0], folded[1], r, relu, folded[2]);
    }
    case Route::kScaled:
      return onednn_conv_binary(a, folded[2], folded[0], folded[1], target, "mul", std::nullopt,
                                relu);
    case Route::kFolded:
      return folded_conv(a, folded, r, relu, target);
  }
  TORCH_CHECK(false, "conv2d_bn_eval: unknown route");
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) { m.impl("conv2d_bn_eval", &conv2d_bn_eval_cpu); }

TORCH_LIBRARY_FRAGMENT(resfast, m) {
  m.def("conv2d_bn_eval_cache(bool clear) -> int[]",
        [](bool clear) { return fold_cache().info(clear); });
}

}  // namespace resfast::cpu
