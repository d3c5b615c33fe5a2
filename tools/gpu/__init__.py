"""The CUDA readiness check behind ``tools/gpu_check.py``: one prepared run that verifies
MemSaveMode on a GPU and measures it, written as JSON and rendered as markdown.

Modules: ``matrix`` (every handler family against stock, bit for bit), ``ghost_memory`` (what
ghosts cost, and that backward kernels given one allocate and compute exactly what they do
given the real tensor), ``host_sync`` (the mode never makes the host wait for the GPU),
``plan`` (the benchmark's GPU columns within a time budget), ``results`` (verdict, JSON,
markdown), ``cli`` (the command line).
"""
