"""The benchmark (run from the repository root, not installed): the model zoo for now."""
