// A registered op called from C++ through the dispatcher, so that autograd records it and
// profiles name it as they name a call from Python.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>

namespace resfast::cpu {

// The op `name` (overload "" unless given) with C++ signature Fn; looked up once per call
// site (static).
template <typename Fn>
auto op_handle(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<Fn>();
}

}  // namespace resfast::cpu
