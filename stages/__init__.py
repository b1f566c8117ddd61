"""The pipeline's stage scripts (run as ``python -m stages.<name> <experiment>``).

Importing this package, which happens before any stage imports torch, turns on transparent huge
pages in PyTorch's CPU allocator (``THP_MEM_ALLOC_ENABLE=1``; set the variable to 0 to keep it
off). Torch reads the variable once, at its first allocation. On CPU it removes most of the page
faults of the large activations: the same values, fewer kernel cycles (README "Speed and memory").
"""
import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
