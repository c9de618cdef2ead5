// CPU bn_batch_act and bn_batch_act_backward: a training BatchNorm on y's own
// batch statistics (+ residual) (+ ReLU) in one op each. The per-channel
// arithmetic is that of bn_finalize(_backward) with a zero mean (the mean is
// the centre of bn_act), so the rounding matches the chain of ops it replaces;
// the loops are those of bn_act (kernels/bn_act_kernel.cpp).
#include <torch/library.h>

#include "../checks.h"
#include "activation.h"
#include "bn_affine.h"

namespace resfast::cpu {
namespace {

void check_batch_act_inputs(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual) {
  check_activation(y, "y");
  check_finalize_inputs(mean, var, weight, bias);
  check_channel_vector(mean, y.size(1), y, "mean");
  if (residual) check_same_as(*residual, y, "residual", "y");
}

// Per-channel vectors of one call in the statistics dtype A: scale =
// weight / sqrt(var + eps) and shift = bias (0 without one), as bn_finalize
// computes them for a zero mean.
template <typename A>
struct Affine {
  at::Tensor scale, shift, invstd;
  Affine(const at::Tensor& var, const std::optional<at::Tensor>& weight,
         const std::optional<at::Tensor>& bias, double eps, at::ScalarType dt) {
    const at::Tensor v = channel_values(var, dt);
    const at::Tensor w = weight ? channel_values(*weight, dt) : at::Tensor();
    const int64_t C = v.size(0);
    scale = at::empty({C}, v.options());
    invstd = at::empty({C}, v.options());
    shift = bias ? channel_values(*bias, dt) : at::zeros({C}, v.options());
    const A* vp = v.const_data_ptr<A>();
    const A* wp = w.defined() ? w.const_data_ptr<A>() : nullptr;
    A* sp = scale.mutable_data_ptr<A>();
    A* ip = invstd.mutable_data_ptr<A>();
    const A e = static_cast<A>(eps);
    for (int64_t c = 0; c < C; ++c) {
      ip[c] = bn_invstd(vp[c], e);
      sp[c] = wp ? ip[c] * wp[c] : ip[c];
    }
  }
};

template <typename F>
void with_stats_type(at::ScalarType dt, const F& f) {
  if (dt == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

at::Tensor bn_batch_act_cpu(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, bool relu, double eps) {
  check_batch_act_inputs(y, mean, var, weight, bias, residual);
  at::Tensor out = at::empty_like(y);
  if (y.numel() == 0) return out;
  const auto dt = stats_dtype(y);
  with_stats_type(dt, [&](auto a) {
    const Affine<decltype(a)> affine(var, weight, bias, eps, dt);
    const at::Tensor centre = channel_values(mean, dt);
    const auto format = loop_format(y);
    const at::Tensor y_dense = dense(y, format);
    const at::Tensor res = residual ? dense(*residual, format) : at::Tensor();
    at::Tensor buffer = buffer_for(out, format);
    kernels().bn_act({y_dense.const_data_ptr(), y.scalar_type(), geometry(y, format),
                      affine.scale.const_data_ptr(), affine.shift.const_data_ptr(),
                      centre.const_data_ptr(), data_or_null(res), relu,
                      buffer.mutable_data_ptr()});
    copy_back(out, buffer);
  });
  return out;
}

// Pass 1 reduces sum_g = sum(g) and sum_gy = sum(g * (y - mean)) (and writes
// grad_residual = g, which pass 2 then reads in place of grad_out, the residual
// and the ReLU mask); pass 2 writes grad_y = g * scale + (y - mean) * slope + offset,
// the path through mean and var being slope = 2 grad_var / count and
// offset = grad_mean / count, with grad_var and grad_mean as bn_finalize_backward and
// bn_act's centre give them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_batch_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, bool relu, double eps,
    std::array<bool, 4> output_mask) {
  check_batch_act_inputs(y, mean, var, weight, bias, residual);
  check_same_as(grad_out, y, "grad_out", "y");
  const auto dt = stats_dtype(y);
  const int64_t C = y.size(1);
  const bool want_weight = output_mask[1] && weight.has_value();
  const bool want_bias = output_mask[2] && bias.has_value();
  const bool sums = output_mask[0] || want_weight || want_bias;
  const auto format = loop_format(y);
  // grad_out held by this call alone (no other handle, no view: the autograd node hands
  // over the gradient it received, BnBatchAct::backward) is overwritten with one of the
  // outputs, each element after its last read: a training step then allocates, and faults
  // in, one activation-sized buffer less per layer. Every other caller keeps grad_out.
  const bool reuse = grad_out.use_count() == 1 && grad_out.storage().use_count() == 1 &&
                     grad_out.is_contiguous(format) && y.numel() > 0;
  const bool reuse_for_residual = reuse && output_mask[3];  // pass 1 writes it
  const bool reuse_for_y = reuse && !output_mask[3];       // pass 2 writes it
  auto empty = [&](at::ScalarType t) { return at::empty({0}, y.options().dtype(t)); };
  at::Tensor grad_y = reuse_for_y && output_mask[0] ? grad_out
                      : output_mask[0]              ? at::empty_like(y)
                                                    : empty(y.scalar_type());
  at::Tensor grad_residual = reuse_for_residual ? grad_out
                             : output_mask[3]   ? at::empty_like(y)
                                                : empty(y.scalar_type());
  at::Tensor grad_weight = empty(dt), grad_bias = empty(dt);
  if (!sums && !output_mask[3]) return {grad_y, grad_weight, grad_bias, grad_residual};
  with_stats_type(dt, [&](auto a) {
    using A = decltype(a);
    const Affine<A> affine(var, weight, bias, eps, dt);
    const at::Tensor centre = channel_values(mean, dt);
    at::Tensor sum_gy = at::zeros({sums ? C : 0}, y.options().dtype(dt));
    at::Tensor sum_g = at::zeros({sums ? C : 0}, y.options().dtype(dt));
    const Geometry geo = geometry(y, format);
    const at::Tensor go = y.numel() ? dense(grad_out, format) : at::Tensor();
    const at::Tensor y_dense = y.numel() ? dense(y, format) : at::Tensor();
    const at::Tensor res = relu && residual && y.numel() ? dense(*residual, format) : at::Tensor();
    ActBackwardArgs args{data_or_null(go), data_or_null(y_dense), y.scalar_type(), geo,
                         affine.scale.const_data_ptr(), affine.shift.const_data_ptr(),
                         centre.const_data_ptr(), data_or_null(res), relu,
                         nullptr, nullptr, nullptr, nullptr};
    at::Tensor gr_buffer;  // outlives pass 1: pass 2 reads g from it
    if (y.numel() > 0) {
      gr_buffer = output_mask[3] ? buffer_for(grad_residual, format) : at::Tensor();
      args.grad_residual = mutable_data_or_null(gr_buffer);
      args.sum_gy = sums ? sum_gy.mutable_data_ptr() : nullptr;
      args.sum_g = sums ? sum_g.mutable_data_ptr() : nullptr;
      kernels().bn_act_backward(args);
      if (output_mask[3]) copy_back(grad_residual, gr_buffer);
    }
    if (!sums) return;
    // bn_finalize_backward's formulas for a zero mean, and the centre's gradient.
    at::Tensor slope = at::empty({C}, sum_g.options());
    at::Tensor offset = at::empty({C}, sum_g.options());
    if (want_weight) grad_weight = at::empty({C}, sum_g.options());
    const A* gy = sum_gy.const_data_ptr<A>();
    const A* g = sum_g.const_data_ptr<A>();
    const A* sc = affine.scale.template const_data_ptr<A>();
    const A* is = affine.invstd.template const_data_ptr<A>();
    const at::Tensor w = weight ? channel_values(*weight, dt) : at::Tensor();
    const A* wp = w.defined() ? w.const_data_ptr<A>() : nullptr;
    const A inv_count = static_cast<A>(1.0 / static_cast<double>(std::max<int64_t>(
                                                 count_per_channel(y), 1)));
    A* sl = slope.mutable_data_ptr<A>();
    A* of = offset.mutable_data_ptr<A>();
    A* gw = want_weight ? grad_weight.mutable_data_ptr<A>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const A wc = wp ? wp[c] : A(1);
      const A grad_var = bn_grad_var(gy[c], wc, is[c]);
      const A grad_mean = -sc[c] * g[c];
      sl[c] = A(2) * grad_var * inv_count;
      of[c] = grad_mean * inv_count;
      if (gw) gw[c] = gy[c] * is[c];
    }
    if (want_bias) grad_bias = sum_g;
    if (!output_mask[0] || y.numel() == 0) return;
    at::Tensor gy_buffer = buffer_for(grad_y, format);
    args.grad_y = gy_buffer.mutable_data_ptr();
    if (args.grad_residual != nullptr) {
      // g itself, written by pass 1: read it instead of grad_out and the mask's inputs.
      args.grad_out = args.grad_residual;
      args.residual = nullptr;
      args.relu = false;
    }
    args.grad_residual = args.sum_gy = args.sum_g = nullptr;
    args.stats_slope = slope.const_data_ptr();
    args.stats_offset = offset.const_data_ptr();
    kernels().bn_act_backward(args);
    copy_back(grad_y, gy_buffer);
  });
  return {grad_y, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("bn_batch_act", &bn_batch_act_cpu);
  m.impl("bn_batch_act_backward", &bn_batch_act_backward_cpu);
}

}  // namespace resfast::cpu
