"""The adapted linear layer: the base `nn.Linear` plus the masked low-rank update computed by
the native kernels.

- `linear.py`: `TLoraLinear`, the module swapped in for each adapted `nn.Linear`: its factors,
  their device and dtype moves, the forward (training, inference fold, compiled);
- `ops.py`: the autograd Function and the torch.compile custom ops over the kernels, and
  `lowrank_update`, the update as a plain differentiable function;
- `state.py`: what the layers of one adapter share: the ranks of the current forward and the
  masks built from them (`RankState`), and the folded inference weights (`FoldCache`).
"""

from .linear import TLoraLinear
from .ops import COMPUTE_DTYPES, lowrank_update
from .state import FoldCache, RankState, rank_mask

__all__ = ["COMPUTE_DTYPES", "FoldCache", "RankState", "TLoraLinear", "lowrank_update", "rank_mask"]
