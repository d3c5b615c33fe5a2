"""Developer tools run from a checkout's root (not installed): ``python -m tools.bench``."""
