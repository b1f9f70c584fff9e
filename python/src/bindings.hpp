// The pieces of the epcomm._epcomm module, one function per file that fills it in.
#pragma once

#include <pybind11/pybind11.h>

namespace epcomm::python {

// Runtime (one rank's communicator + epcomm::Buffer) and DispatchCall: runtime.cpp.
void bind_runtime(pybind11::module_& m);
// Low-latency methods of Runtime (after bind_runtime), LowLatencyCall, the low-latency size hint,
// wrap_memory (DLPack views of raw memory) and the FP8 reference cast: low_latency.cpp.
void bind_low_latency(pybind11::module_& m);

}  // namespace epcomm::python
