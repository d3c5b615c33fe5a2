// Carrying out a saving policy's decisions on the node stock just built (slots.apply): one
// decision per saved slot, the bytes stock would keep and the bytes kept, for the report.
#pragma once

#include "holders.h"

#include <c10/util/SmallVector.h>

#include <array>
#include <initializer_list>
#include <memory>
#include <vector>

namespace memsave {

// Encoded: the forward pass made the window offsets itself (`made`); the indices stock saves are a ghost.
enum class Decision : uint8_t { Keep, Drop, Encode, EncodeWhenUnshared, Encoded };

// One slot of the node, the tensor stock saves there (undefined: none), and its fate.
struct SlotDecision {
  SavedVariable* slot;
  at::Tensor tensor;
  Decision decision;
  std::shared_ptr<const Codec> codec;
  KeptTensors made = {};
};

using Decisions = c10::SmallVector<SlotDecision, 6>;
using Outputs = c10::SmallVector<at::Tensor, 3>;

struct Outcome {
  int64_t stock_bytes = 0;
  int64_t kept_bytes = 0;
  std::array<uint8_t, kNumLabels> labels{};  // changed slots per Label (slots.apply: one count per slot)
};

// Where the call records: every mode active in this thread, as the innermost sees the operator.
struct CallSite {
  int op;
  const Entry* entry;
  ThreadState* thread;
  void to_stock(Reason reason) const;
  void handled(const Outcome& outcome) const;
  std::shared_ptr<const TalliesList> tallies() const;
};

Outcome apply(const NodePtr& node, const Decisions& saved, const Outputs& outputs, const CallSite& site);

}  // namespace memsave
