// The meta kernel: tensors with a shape, a dtype and a byte size but no storage. Building a model
// on it runs every constructor (the real plugins', third-party ones included) and so gives exact
// parameter shapes without allocating: `moelab inspect` counts a 671B-parameter recipe this way.
#pragma once

#include <memory>

#include "moelab/kernel.hpp"

namespace moelab {

// empty/zeros return tensors on DeviceKind::meta whose Buffer has data = nullptr and the
// requested byte size; every op that would read or write data (fill, copy, all compute) throws
// RuntimeError("<op>: meta tensors hold no data ...").
std::shared_ptr<Ops> make_meta_ops();

}  // namespace moelab
