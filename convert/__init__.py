"""Convert Hugging Face checkpoints to MLX (installed as ``mlxserve.convert``).

    from mlxserve.convert import ConvertConfig, convert
    report = convert(ConvertConfig(source="path/or/org-name", output=Path("out")))
"""

from .pipeline import ConvertConfig, ConvertReport, convert
from .quantize import QuantSpec

__all__ = ["ConvertConfig", "ConvertReport", "QuantSpec", "convert"]
