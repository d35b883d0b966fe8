"""py4dstem-deepcdi: deep-learning coherent diffractive imaging for 4D-STEM, a py4DSTEM plugin.

Importing the package registers ``DataCube.reconstruct_deepcdi`` on py4DSTEM's DataCube and, through
``_emd_hook``, :class:`DeepCDIReconstruction` with emdfile, so that ``py4DSTEM.read`` reopens saved reconstructions.
"""

from . import reconstruction
from ._version import __version__
from .models import DeepCDIModel, list_pretrained, load_model, load_pretrained
from .network import ResUNet
from .probe import POLAR_NAMES, AberrationRanges, ProbeGeometry
from .probe_recovery import ProbeRecovery, recover_probe
from .reconstruction import DeepCDIReconstruction, read_reconstruction, reconstruct_deepcdi
from .simulation import ForwardModel, SimulatedDataset, simulate_dataset
from .stream import StreamConfig, TrainingStream
from .training import TrainConfig, Trainer

reconstruction._register()
#: emdfile looks for its node classes in packages that set this (py4DSTEM does the same)
_emd_hook = True

__all__ = [
    "DeepCDIReconstruction",
    "read_reconstruction",
    "reconstruct_deepcdi",
    "POLAR_NAMES",
    "AberrationRanges",
    "ProbeRecovery",
    "recover_probe",
    "DeepCDIModel",
    "ForwardModel",
    "ProbeGeometry",
    "ResUNet",
    "SimulatedDataset",
    "StreamConfig",
    "TrainConfig",
    "Trainer",
    "TrainingStream",
    "__version__",
    "list_pretrained",
    "load_model",
    "load_pretrained",
    "simulate_dataset",
]
