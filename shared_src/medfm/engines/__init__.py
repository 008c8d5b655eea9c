from .checkpoint import AtomicCheckpointSaver, ResumeFromCheckpoint, atomic_torch_save, latest_checkpoint
from .image_handler import ReconstructionImageHandler, reconstruction_panel
from .iteration import SSLIteration, loss_terms
from .prepare_batch import FratMAEPrepareBatch
from .progress import ProgressBar

__all__ = [
    "AtomicCheckpointSaver",
    "FratMAEPrepareBatch",
    "ProgressBar",
    "ReconstructionImageHandler",
    "ResumeFromCheckpoint",
    "SSLIteration",
    "atomic_torch_save",
    "latest_checkpoint",
    "loss_terms",
    "reconstruction_panel",
]
