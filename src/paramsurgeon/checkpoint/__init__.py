"""The checkpoint model, torch-free: lazy tensors by name, the rest of the file, ties.

    tensor.py       Storage and Tensor: views into file spans or new values
    checkpoint.py   Checkpoint, and finding the tensors inside a nested file
    kinds.py        which layer a tensor belongs to (conv, linear, batchnorm, ...)
    layouts.py      which way each 2-D weight is stored (nn.Linear or GPT-2 Conv1D), told per tensor
    extras.py       everything besides the tensors (epoch, optimizer state), summarised
    opaque.py       what a pickle's globals and calls become when nothing is imported or run
    hfties.py       the tied names a Hugging Face file leaves out, read back as aliases
    contents.py     a tensor's values as row-major bytes; whether two tensors hold the same
    values.py       the bridge to torch (imported only where values are computed)
"""

from .checkpoint import Checkpoint, find_container
from .tensor import Storage, Tensor, check_view, tie_groups

__all__ = ["Checkpoint", "Storage", "Tensor", "check_view", "find_container", "tie_groups"]
