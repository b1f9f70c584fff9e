// The one home of every EPCOMM_* environment variable the library reads: name, default, meaning.
// `epcomm-bench --print-env` lists them; README's table is checked against this list
// (tests/cpu/test_env_table.cpp: same names, same defaults). A variable that changes results also
// has a BufferOptions field (or a Group argument) whose default it is.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace epcomm {

struct EnvParam {
  const char* name;
  int64_t default_value;
  const char* meaning;
};

const std::vector<EnvParam>& env_params();
// The value of one parameter: the environment's if set (and a valid integer), else the default.
int64_t env_value(const char* name);

}  // namespace epcomm
