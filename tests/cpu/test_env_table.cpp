// README's environment table against the registry (core/env.cpp, `epcomm-bench --print-env`): the
// same variables, the same defaults. A variable added, removed or given another default in one
// place and not the other fails here, naming it.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "core/env.hpp"

namespace epcomm {
namespace {

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  const size_t e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

// The rows of the table under `heading` whose first cell is a `EPCOMM_*` name: name -> default cell.
std::map<std::string, std::string> readme_env_rows(const std::string& path, const std::string& heading,
                                                   std::vector<std::string>* duplicates) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot read " << path;
  std::map<std::string, std::string> rows;
  std::string line;
  bool in_section = false;
  while (std::getline(in, line)) {
    if (line.rfind("## ", 0) == 0) {
      in_section = line == heading;
      continue;
    }
    if (!in_section || line.rfind("| `EPCOMM_", 0) != 0) continue;
    std::vector<std::string> cells;
    std::stringstream ss(line.substr(1));
    for (std::string cell; std::getline(ss, cell, '|');) cells.push_back(trim(cell));
    if (cells.size() < 3) {
      ADD_FAILURE() << "row with fewer than three cells: " << line;
      continue;
    }
    std::string name = cells[0];
    if (name.size() < 2 || name.front() != '`' || name.back() != '`') {
      ADD_FAILURE() << "name cell not in backquotes: " << line;
      continue;
    }
    name = name.substr(1, name.size() - 2);
    if (rows.count(name)) duplicates->push_back(name);
    rows[name] = cells[1];
  }
  return rows;
}

TEST(EnvTable, ReadmeListsEveryRegistryVariableWithItsDefault) {
  const std::string readme = std::string(EPCOMM_SOURCE_DIR) + "/README.md";
  std::vector<std::string> duplicates;
  const std::map<std::string, std::string> rows = readme_env_rows(readme, "## Environment variables", &duplicates);
  EXPECT_TRUE(duplicates.empty()) << "listed twice in README: " << ::testing::PrintToString(duplicates);
  ASSERT_FALSE(rows.empty()) << "no `EPCOMM_*` rows under \"## Environment variables\" in " << readme;

  std::map<std::string, int64_t> registry;
  for (const EnvParam& p : env_params()) registry[p.name] = p.default_value;
  for (const auto& [name, value] : registry) {
    auto it = rows.find(name);
    if (it == rows.end()) {
      ADD_FAILURE() << name << " (default " << value << ") is in env_params() but not in README's table";
      continue;
    }
    EXPECT_EQ(it->second, std::to_string(value)) << name << ": README's default differs from env_params()";
  }
  for (const auto& [name, cell] : rows)
    EXPECT_TRUE(registry.count(name)) << name << " (default " << cell
                                      << ") is in README's table but not in env_params()";
}

}  // namespace
}  // namespace epcomm
