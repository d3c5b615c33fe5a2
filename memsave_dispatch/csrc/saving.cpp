#include "saving.h"

#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <utility>

namespace memsave {

void CallSite::to_stock(Reason reason) const {
  for (const auto& scope : thread->scopes) scope->tallies->add_stock(op, entry->family, reason);
}

void CallSite::handled(const Outcome& outcome) const {
  for (const auto& scope : thread->scopes)
    scope->tallies->add_handled(op, entry->family, outcome.stock_bytes, outcome.kept_bytes, outcome.labels);
}

std::shared_ptr<const TalliesList> CallSite::tallies() const {
  return thread->tallies;
}

namespace {

// Bytes by storage, each storage once (storage.py's storage_key): parameters outlive the
// graph and empty storages cost nothing, so neither counts.
class StorageBytes {
 public:
  // The storage's key and bytes, or {nullptr, 0} where it does not count.
  static std::pair<const void*, int64_t> key_of(const at::Tensor& tensor) {
    if (is_parameter(tensor)) return {nullptr, 0};
    const c10::Storage& storage = tensor.storage();
    const int64_t nbytes = int64_t(storage.nbytes());
    if (!nbytes) return {nullptr, 0};
    return {storage.data(), nbytes};
  }
  void add(std::pair<const void*, int64_t> key) {
    if (!key.first) return;
    for (auto& entry : entries_)
      if (entry.first == key.first) {
        entry.second = key.second;
        return;
      }
    entries_.push_back(key);
  }
  int64_t total() const {
    int64_t sum = 0;
    for (const auto& entry : entries_) sum += entry.second;
    return sum;
  }

 private:
  c10::SmallVector<std::pair<const void*, int64_t>, 6> entries_;
};

Label label_of(const SlotDecision& d) {
  switch (d.decision) {
    case Decision::Drop: return kDropped;
    case Decision::EncodeWhenUnshared: return kShared;
    default: return d.codec->label;
  }
}

int output_index(const at::Tensor& tensor, const Outputs& outputs) {
  for (size_t i = 0; i < outputs.size(); ++i)
    if (outputs[i].is_same(tensor)) return int(i);
  return -1;
}

}  // namespace

Outcome apply(const NodePtr& node, const Decisions& saved, const Outputs& outputs, const CallSite& site) {
  StorageBytes stock, kept;
  Outcome outcome;
  int64_t encoded_bytes = 0;
  c10::SmallVector<std::pair<at::Tensor, std::shared_ptr<Waiting>>, 2> waiting;
  for (const SlotDecision& d : saved) {
    const at::Tensor& tensor = d.tensor;
    if (!tensor.defined()) continue;
    const auto key = StorageBytes::key_of(tensor);
    stock.add(key);
    // a parameter (no storage key) lives on, unshared never: kept as it is (slots.apply)
    const bool parameter_waits = d.decision == Decision::EncodeWhenUnshared && !key.first;
    if (d.decision == Decision::Keep || tensor.numel() == 0 || parameter_waits) {  // an empty tensor costs nothing
      kept.add(key);
      continue;
    }
    ++outcome.labels[label_of(d)];
    const int output = output_index(tensor, outputs);
    // stock names the node itself for one of its own outputs, else the tensor's producer
    Origin origin = output >= 0 && !tensor.is_leaf() ? Origin(tensor, node.get(), tensor.output_nr()) : Origin(tensor);
    switch (d.decision) {
      case Decision::Drop:
        hook(*d.slot, std::make_shared<GhostCore>(std::move(origin)));
        break;
      case Decision::Encode:
      case Decision::Encoded: {
        auto core = std::make_shared<EncodedCore>(std::move(origin), d.codec, false);
        if (d.decision == Decision::Encoded) core->encoded = d.codec->encoded_offsets(tensor, d.made);
        hook(*d.slot, core);
        std::lock_guard<std::mutex> lock(core->mutex);
        encoded_bytes += core->encoded.nbytes();
        break;
      }
      case Decision::EncodeWhenUnshared: {
        kept.add(key);
        auto entry = std::make_shared<Waiting>();
        // stock keeps a node's own output (requiring grad) as a separate alias, which the
        // tensor may die before; anything else it keeps as is: a deferred holder replaces it
        if (output < 0 || !tensor.requires_grad()) {
          auto core = std::make_shared<EncodedCore>(std::move(origin), d.codec, true);
          hook(*d.slot, core);
          entry->holder = core;
        } else {
          entry->node = c10::weak_intrusive_ptr<Node>(node);
          entry->slot = d.slot;
          entry->output_nr = tensor.output_nr();
        }
        entry->codec = d.codec;
        entry->version = torch::autograd::impl::version_counter(tensor);
        entry->saved_version = entry->version.current_version();
        entry->nbytes = key.second;
        entry->op = site.op;
        entry->tallies = site.tallies();
        entry->book = site.thread->pending;
        entry->epoch = entry->book->epoch.load(std::memory_order_acquire);
        waiting.emplace_back(tensor, std::move(entry));
        break;
      }
      case Decision::Keep:
        break;
    }
  }
  for (auto& [tensor, entry] : waiting) {
    auto state = watch(tensor);
    if (!state) continue;
    if (site.thread->pooling_depth > 0) site.thread->pooling_waiting.emplace_back(state, entry);
    state->add(std::move(entry));
  }
  outcome.stock_bytes = stock.total();
  outcome.kept_bytes = kept.total() + encoded_bytes;
  return outcome;
}

}  // namespace memsave
