// Command-line pieces shared by epcomm-bench and epcomm-wire-probe.
#pragma once

#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace epcomm::bench {

// "16,24,32" -> {16, 24, 32}.
inline std::vector<int> parse_list(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) v.push_back(std::atoi(item.c_str()));
  return v;
}

}  // namespace epcomm::bench
