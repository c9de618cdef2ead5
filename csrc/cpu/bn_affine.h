// The per-channel arithmetic of bn_finalize and bn_finalize_backward, shared with
// bn_batch_act(_backward), which must round exactly as the chain of ops it replaces.
// A is the statistics' compute type: float, or double for double statistics.
#pragma once

#include <cmath>

namespace resfast::cpu {

template <typename A>
inline A bn_invstd(A var, A eps) {
  return A(1) / std::sqrt(var + eps);
}

// The gradient of var through scale = weight * invstd, given scale's gradient.
template <typename A>
inline A bn_grad_var(A grad_scale, A weight, A invstd) {
  return grad_scale * weight * A(-0.5) * invstd * invstd * invstd;
}

}  // namespace resfast::cpu
