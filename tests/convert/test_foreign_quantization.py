"""Checkpoints quantized by other libraries, and flag combinations that cannot work."""

from __future__ import annotations

import json
import shutil

import pytest

from mlxserve.convert import ConvertConfig, convert
from mlxserve.errors import ConvertError, ModelLoadError
from mlxserve.models.loader import load_model


def test_gptq_checkpoint_is_refused_clearly(tiny_ckpt, tmp_path):
    src = tmp_path / "gptq"
    shutil.copytree(tiny_ckpt("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as e:
        load_model(src)
    assert str(e.value) == (
        "this checkpoint is quantized with 'gptq', which mlxserve cannot load; "
        "use the full-precision checkpoint (and convert it with `mlxserve convert`)"
    )


def test_recipe_without_quantization_is_an_error(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as e:
        convert(ConvertConfig(source=str(tiny_ckpt("llama")), output=out, quantize=False, recipe="mixed_3_6"))
    assert e.value.param == "quant_recipe"
    assert str(e.value) == "--quant-recipe needs quantization; drop --no-quantize"
    assert not out.exists()
