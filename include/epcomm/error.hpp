// Error types. Every failure that reaches a user is one of these, with a message that names what
// failed, the value seen and the rule it broke (or, for GPU timeouts, kernel, phase, rank and peer).
#pragma once

#include <stdexcept>
#include <string>

namespace epcomm {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A bad argument: dtype, shape, range, device, size. Python maps it to ValueError. Raised before
// anything is launched; the buffer stays usable.
class ArgumentError : public Error {
 public:
  using Error::Error;
};

// A GPU wait that ran past its timeout, or a peer that reported one. The message carries the
// diagnostic record (kernel, phase, rank, awaited peer, values seen).
class TimeoutError : public Error {
 public:
  using Error::Error;
};

// A failed CUDA or NCCL call, or a feature this build or machine does not have.
class RuntimeFailure : public Error {
 public:
  using Error::Error;
};

[[noreturn]] void throw_argument_error(const std::string& message);

}  // namespace epcomm
