// The operators the compiled engine runs, and installing its kernels for them.
#pragma once

#include <string>
#include <vector>

namespace memsave {

// Names ("aten::relu") of the operators with a C++ saving rule; an operator's index is its
// position here.
std::vector<std::string> rule_op_names();

// Capture stock's AutogradCPU kernel of these operators: before anything overrides them.
void capture(const std::vector<int>& ops);
// Register this engine's AutogradCPU kernels for them, over whatever runs now (the Python
// engine's kernel at the Autograd alias, which becomes the kernel every call this engine
// does not take is handed to). Idempotent.
void install(const std::vector<int>& ops);
// Remove every registration of this engine (only while no other thread runs operators).
void uninstall();

// The autograd node types (``type(grad_fn).__name__``) with a recipe (recipes.py): a call with
// an input such a node produced goes to the Python engine, which alone rebuilds tensors.
// Empty where rebuilds are not available. Replaced whole; safe against concurrent readers.
void set_recipe_nodes(std::vector<std::string> names);

}  // namespace memsave
