from .best_model import BestModelSaver
from .checkpoint import AtomicCheckpointSaver, ResumeFromCheckpoint, atomic_torch_save, latest_checkpoint
from .distributed import EVERY_RANK_HANDLERS, handlers_for_rank
from .image_handler import ReconstructionImageHandler, reconstruction_panel
from .iteration import SSLIteration, loss_terms
from .prepare_batch import FratMAEPrepareBatch
from .progress import ProgressBar

__all__ = [
    "BestModelSaver",
    "EVERY_RANK_HANDLERS",
    "AtomicCheckpointSaver",
    "FratMAEPrepareBatch",
    "ProgressBar",
    "ReconstructionImageHandler",
    "ResumeFromCheckpoint",
    "SSLIteration",
    "atomic_torch_save",
    "handlers_for_rank",
    "latest_checkpoint",
    "loss_terms",
    "reconstruction_panel",
]
