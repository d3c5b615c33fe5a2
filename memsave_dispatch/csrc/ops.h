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

}  // namespace memsave
