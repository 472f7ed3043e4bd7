"""The adapted linear layer: the base `nn.Linear` plus the masked low-rank update computed by
the native kernels.

- `linear.py`: `TLoraLinear`, the module swapped in for each adapted `nn.Linear`: its factors,
  their device and dtype moves, the forward (training, inference fold, compiled);
- `ops.py`: the autograd Function and the torch.compile custom ops over the kernels, and
  `lowrank_update`, the update as a plain differentiable function;
- `ranks.py`: the ranks the layers of one adapter share for the current forward and the masks
  built from them (`RankState`), and r(t) as tensor ops on the timestep's device;
- `folds.py`: the folded inference weights of the layers of one adapter (`FoldCache`).
"""

from .folds import FoldCache
from .linear import TLoraLinear
from .ops import COMPUTE_DTYPES, lowrank_update
from .ranks import RankState, rank_mask

__all__ = ["COMPUTE_DTYPES", "FoldCache", "RankState", "TLoraLinear", "lowrank_update", "rank_mask"]
