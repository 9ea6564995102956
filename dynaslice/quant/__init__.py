"""Quantization of chosen subnets: int8 on onnxruntime, FDDA calibration data, low-bit fake quantization.

- :mod:`.ptq`: ``quantize_artifact`` -- int8 static QDQ quantization of any ONNX artifact dynaslice
  exports (a subnet file, a gated package, a budget-table package), its exact MAC/bit accounting, and its accuracy beside
  the float original;
- :mod:`.calibration`: where calibration images come from (real, FDDA, GDFQ, noise), one interface;
- :mod:`.fdda`: FDDA's BNS centres, losses and conditional generator;
- :mod:`.fakequant`: W4A4-style fake quantization (per-channel weights, EMA activation ranges) and
  the distillation fine-tuning (:class:`DistillTrainer`), where FDDA's accuracy gains show.

Both trainings (FDDA's generator, :class:`GeneratorTrainer`; the student's fine-tuning) run on
dynaslice's training engine (:mod:`dynaslice.train.engine`).

See ``docs/QUANT.md``.
"""

from .calibration import (
    KINDS,
    CalibrationSource,
    GeneratorImages,
    NoiseImages,
    RealImages,
    SourceBatches,
    calibration_images,
    calibration_source,
    check_calibration_size,
)
from .fakequant import DistillConfig, DistillTrainer, distill_config, kd_loss, observe_ranges, quantize_model
from .fdda import BNCentres, ConditionalGenerator, FDDAConfig, GeneratorTrainer, bn_centres, train_generator
from .ptq import (
    artifact_archs,
    artifact_input_shape,
    artifact_kind,
    check_subnet,
    compare_artifacts,
    evaluate_artifact,
    graph_accounting,
    quantize_artifact,
)

__all__ = [
    "KINDS",
    "BNCentres",
    "CalibrationSource",
    "ConditionalGenerator",
    "DistillConfig",
    "DistillTrainer",
    "FDDAConfig",
    "GeneratorTrainer",
    "GeneratorImages",
    "NoiseImages",
    "RealImages",
    "SourceBatches",
    "artifact_archs",
    "artifact_input_shape",
    "artifact_kind",
    "bn_centres",
    "calibration_images",
    "calibration_source",
    "check_calibration_size",
    "check_subnet",
    "compare_artifacts",
    "distill_config",
    "evaluate_artifact",
    "graph_accounting",
    "kd_loss",
    "observe_ranges",
    "quantize_artifact",
    "quantize_model",
    "train_generator",
]
