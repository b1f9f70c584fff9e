// The one home of every EPCOMM_* environment variable: name, default, meaning. README's table is
// generated from the same list (`epcomm-bench --print-env`).
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
