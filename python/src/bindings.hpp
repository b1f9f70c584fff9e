// The pieces of the epcomm._epcomm module, one function per file that fills it in.
#pragma once

#include <pybind11/pybind11.h>

namespace epcomm::python {

// Runtime (one rank's communicator + epcomm::Buffer) and DispatchCall: runtime.cpp.
void bind_runtime(pybind11::module_& m);

}  // namespace epcomm::python
