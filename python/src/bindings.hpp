// The pieces of the epcomm._epcomm module, one function per file that fills it in.
#pragma once

#include <pybind11/pybind11.h>

namespace epcomm::python {

// Runtime (one rank's communicator + epcomm::Buffer) and DispatchCall: runtime.cpp.
void bind_runtime(pybind11::module_& m);
// Low-latency methods of Runtime (after bind_runtime), LowLatencyCall, the low-latency size hint,
// wrap_memory (DLPack views of raw memory) and the FP8 reference cast: low_latency.cpp.
void bind_low_latency(pybind11::module_& m);
// The eager low-latency calls in one C call each (after bind_low_latency): eager.cpp.
void bind_eager(pybind11::module_& m);

// Inside a catch block of a function pybind11 does not wrap (a METH_FASTCALL one): sets the Python
// error the exception in flight stands for, as the module's exception translators would (epcomm's
// errors as epcomm.Error / ArgumentError / TimeoutError): module.cpp.
void set_python_error();

}  // namespace epcomm::python
