#include "epcomm/group.hpp"

namespace epcomm {

Group::Group(int rank, int size, int device, int ranks_per_node)
    : rank_(rank), size_(size), device_(device), ranks_per_node_(ranks_per_node) {}
Group::~Group() = default;
SymmetricMemory::~SymmetricMemory() = default;

}  // namespace epcomm
