from .best_model import BestModelSaver, ServedModelSaver
from .checkpoint import AtomicCheckpointSaver, ResumeFromCheckpoint, atomic_torch_save, latest_checkpoint
from .distributed import EVERY_RANK_HANDLERS, end_distributed, handlers_for_rank
from .failures import FailedItemsError, FailedItemsWriter, SkipFailedIteration, failed_items
from .image_handler import ReconstructionImageHandler, reconstruction_panel
from .iteration import SSLIteration, loss_scalar, loss_terms
from .midol_iteration import MIDoLIteration, MIDoLPrepareBatch
from .panfm_handlers import OrganAttentionPlot, attention_bar_image
from .panfm_iteration import PanFMIteration, PanFMPrepareBatch
from .prepare_batch import FratMAEPrepareBatch
from .progress import ProgressBar
from .sampler_epoch import SamplerEpochHandler
from .schedules import cosine_schedule, set_weight_decay
from .spad_inferer import SpadSlidingWindowInferer
from .spad_mim import SpadMIMPrepareBatch, batch_aniso_d
from .spad_prepare_batch import SpadPrepareBatch
from .step_seed import StepSeedHandler
from .tokenizer_iteration import TokenizerIteration
from .tracking import executed_config, mlflow_settings

__all__ = [
    "FailedItemsError",
    "FailedItemsWriter",
    "SkipFailedIteration",
    "failed_items",
    "EVERY_RANK_HANDLERS",
    "AtomicCheckpointSaver",
    "BestModelSaver",
    "FratMAEPrepareBatch",
    "MIDoLIteration",
    "MIDoLPrepareBatch",
    "OrganAttentionPlot",
    "PanFMIteration",
    "PanFMPrepareBatch",
    "ProgressBar",
    "ReconstructionImageHandler",
    "ResumeFromCheckpoint",
    "SSLIteration",
    "SamplerEpochHandler",
    "StepSeedHandler",
    "ServedModelSaver",
    "SpadMIMPrepareBatch",
    "SpadPrepareBatch",
    "SpadSlidingWindowInferer",
    "TokenizerIteration",
    "atomic_torch_save",
    "attention_bar_image",
    "batch_aniso_d",
    "cosine_schedule",
    "set_weight_decay",
    "end_distributed",
    "executed_config",
    "handlers_for_rank",
    "latest_checkpoint",
    "loss_scalar",
    "loss_terms",
    "mlflow_settings",
    "reconstruction_panel",
]
