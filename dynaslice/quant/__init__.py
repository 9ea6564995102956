"""Quantization of chosen subnets: int8 on onnxruntime, FDDA calibration data, low-bit fake quantization.

- :mod:`.ptq`: ``quantize_artifact`` -- int8 static QDQ quantization of any ONNX artifact dynaslice
  exports (a subnet file, a gated package), its exact MAC/bit accounting, and its accuracy beside
  the float original;
- :mod:`.calibration`: where calibration images come from (real, FDDA, GDFQ, noise), one interface;
- :mod:`.fdda`: FDDA's BNS centres, losses and conditional generator;
- :mod:`.fakequant`: W4A4-style fake quantization (per-channel weights, EMA activation ranges) and
  the distillation fine-tuning pieces, where FDDA's accuracy gains show.

See ``docs/QUANT.md``.
"""

from .calibration import (
    KINDS,
    CalibrationSource,
    GeneratorImages,
    NoiseImages,
    RealImages,
    calibration_images,
    calibration_source,
)
from .fakequant import kd_loss, observe_ranges, quantize_model
from .fdda import BNCentres, ConditionalGenerator, FDDAConfig, bn_centres, train_generator
from .ptq import artifact_kind, compare_artifacts, evaluate_artifact, graph_accounting, quantize_artifact

__all__ = [
    "KINDS",
    "BNCentres",
    "CalibrationSource",
    "ConditionalGenerator",
    "FDDAConfig",
    "GeneratorImages",
    "NoiseImages",
    "RealImages",
    "artifact_kind",
    "bn_centres",
    "calibration_images",
    "calibration_source",
    "compare_artifacts",
    "evaluate_artifact",
    "graph_accounting",
    "kd_loss",
    "observe_ranges",
    "quantize_artifact",
    "quantize_model",
    "train_generator",
]
