"""Training and evaluation wiring used by the bundle configs: MONAI engines with multi-task targets."""

from medmtl.engine.batch import MultiTaskBatch
from medmtl.engine.checkpoint import TrainingCheckpoints, atomic_torch_save, load_checkpoint
from medmtl.engine.evaluation import KEY_METRIC, MultiTaskEvaluation, write_evaluation_report
from medmtl.engine.loss_terms import LossTermsAverager
from medmtl.engine.precision import CpuAutocastInferer, cpu_bf16_supported
from medmtl.engine.runtime import PolyLR, log_to_file, setup_runtime

__all__ = [
    "KEY_METRIC",
    "CpuAutocastInferer",
    "LossTermsAverager",
    "MultiTaskBatch",
    "MultiTaskEvaluation",
    "PolyLR",
    "TrainingCheckpoints",
    "atomic_torch_save",
    "cpu_bf16_supported",
    "load_checkpoint",
    "log_to_file",
    "setup_runtime",
    "write_evaluation_report",
]
