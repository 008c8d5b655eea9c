from .batch import StepSeededGenerators, plain_tensor
from .best_model import BestModelSaver, ServedModelSaver
from .checkpoint import AtomicCheckpointSaver, ResumeFromCheckpoint, atomic_torch_save, latest_checkpoint
from .distributed import (
    EVERY_RANK_HANDLERS,
    ddp,
    ddp_device_ids,
    end_distributed,
    handlers_for_rank,
    init_distributed,
    local_device,
)
from .failures import FailedItemsError, FailedItemsWriter, SkipFailedIteration, failed_items
from .fratmae_pretrain import FratMAEPretrainPrepareBatch
from .image_handler import ReconstructionImageHandler, reconstruction_panel
from .iteration import TrainingIteration, clip_and_step, logged_terms, loss_scalar, loss_terms
from .midol_pretrain import MIDoLPretrainIteration, MIDoLPretrainPrepareBatch
from .panfm_handlers import OrganAttentionPlot, attention_bar_image
from .panfm_pretrain import PanFMPretrainIteration, PanFMPretrainPrepareBatch
from .progress import ProgressBar
from .run_state import RunState
from .sampler_epoch import SamplerEpochHandler
from .schedules import cosine_schedule, set_weight_decay
from .spad_inferer import SpadSlidingWindowInferer
from .spad_input import SpadInputPrepareBatch, batch_aniso_d
from .spad_mim import SpadMIMPrepareBatch
from .spad_tokenizer import SpadTokenizerIteration
from .step_seed import StepSeedHandler
from .teacher_student import TeacherStudentIteration
from .tracking import executed_config, mlflow_settings

__all__ = [
    "FailedItemsError",
    "FailedItemsWriter",
    "SkipFailedIteration",
    "failed_items",
    "EVERY_RANK_HANDLERS",
    "ddp",
    "ddp_device_ids",
    "init_distributed",
    "local_device",
    "AtomicCheckpointSaver",
    "BestModelSaver",
    "FratMAEPretrainPrepareBatch",
    "MIDoLPretrainIteration",
    "MIDoLPretrainPrepareBatch",
    "OrganAttentionPlot",
    "PanFMPretrainIteration",
    "PanFMPretrainPrepareBatch",
    "ProgressBar",
    "ReconstructionImageHandler",
    "ResumeFromCheckpoint",
    "RunState",
    "SamplerEpochHandler",
    "StepSeedHandler",
    "StepSeededGenerators",
    "ServedModelSaver",
    "SpadMIMPrepareBatch",
    "SpadInputPrepareBatch",
    "SpadSlidingWindowInferer",
    "SpadTokenizerIteration",
    "TeacherStudentIteration",
    "TrainingIteration",
    "atomic_torch_save",
    "attention_bar_image",
    "batch_aniso_d",
    "cosine_schedule",
    "set_weight_decay",
    "end_distributed",
    "executed_config",
    "handlers_for_rank",
    "latest_checkpoint",
    "clip_and_step",
    "logged_terms",
    "loss_scalar",
    "loss_terms",
    "mlflow_settings",
    "plain_tensor",
    "reconstruction_panel",
]
