"""Fine-tuning methods from the DP transfer-learning literature: parameter selection, LP-FT, sparse fine-tuning."""

from lightning_dp.finetune.lpft import LinearProbeThenFineTune, find_backbone
from lightning_dp.finetune.selection import PRESETS, Selection, head_parameter_names, select_parameters
from lightning_dp.finetune.sparse import SparseFineTuning

__all__ = [
    "PRESETS",
    "LinearProbeThenFineTune",
    "Selection",
    "SparseFineTuning",
    "find_backbone",
    "head_parameter_names",
    "select_parameters",
]
