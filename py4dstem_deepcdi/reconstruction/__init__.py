"""The user's class: :class:`DeepCDIReconstruction`, py4DSTEM style (chained stages, py4DSTEM's keywords and result
names, an emdfile ``Custom`` that ``save`` / ``py4DSTEM.save`` write and ``py4DSTEM.read`` reopens).

Modules: :mod:`.core` (the class: inputs and stages), :mod:`.keywords` (py4DSTEM's keywords, measured positions,
positions mask), :mod:`.checks` (the data against the model), :mod:`.results` (``object``, ``probe``, ``error``,
the summary, the figure, the NaN policy), :mod:`.storage` (the EMD node), :mod:`.reading`
(:func:`read_reconstruction`).
"""

from py4DSTEM import DataCube

from .checks import BRIGHT_FIELD_TOLERANCE, DOSE_SPREAD
from .core import DeepCDIReconstruction, reconstruct_deepcdi
from .reading import read_reconstruction
from .results import KIND, NAN_POLICY
from .storage import StoredModel

__all__ = [
    "BRIGHT_FIELD_TOLERANCE",
    "DOSE_SPREAD",
    "KIND",
    "NAN_POLICY",
    "DeepCDIReconstruction",
    "StoredModel",
    "read_reconstruction",
    "reconstruct_deepcdi",
]


def _register() -> None:
    DataCube.reconstruct_deepcdi = reconstruct_deepcdi
