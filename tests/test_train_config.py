"""TrainConfig refuses a bad value where the run is configured (issue 25): the library, compare's
run specs and the CLI get the same clear ValueError, before any data or model loads."""
import pytest
from typer.testing import CliRunner

from softprompt.cli import app
from softprompt.training.config import TrainConfig


@pytest.mark.parametrize("kw,message", [
    (dict(method="lora"), "unknown method 'lora'; use one of prompt, ptuning, prefix"),
    (dict(method="hard_prompt"), "unknown method 'hard_prompt'"),  # a method, but not a trained one
    (dict(method="ptuning", encoder="gru"), "unknown encoder 'gru'; use one of"),
    (dict(method="prefix", reparam="lora"), "unknown reparam 'lora'; use one of none, mlp"),
    (dict(method="ptuning", reparam="mlp"), "reparam applies to methods 'prompt' and 'prefix'"),
    (dict(context="fast"), "context must be one of auto, cached, full, packed, got 'fast'"),
    (dict(method="prefix", context="packed"), "context 'packed' cannot train prefix tuning"),
    (dict(compile="maybe"), "compile must be one of auto, on, off, got 'maybe'"),
])
def test_bad_values_are_refused_with_what_is_allowed(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_any_spelling_of_a_method_is_read_as_the_training_one():
    assert [TrainConfig(method=m).method for m in ("prompt_tuning", "P_TUNING", "prefix-tuning")] == \
        ["prompt", "ptuning", "prefix"]
    assert TrainConfig(method="prefix", reparam="mlp", context="full", compile=True).reparam == "mlp"


@pytest.mark.parametrize("args,message", [
    (["--context", "fast"], "context must be one of"),
    (["--method", "prefix", "--context", "packed"], "cannot train prefix tuning"),
    (["--compile", "maybe"], "compile must be one of"),
    (["--method", "lora"], "unknown method 'lora'"),
    (["--method", "ptuning", "--encoder", "gru"], "unknown encoder 'gru'"),
])
def test_cli_reports_the_config_error_before_reading_data(tmp_path, args, message):
    """The train file does not exist: a config error reported first was checked before the data."""
    r = CliRunner().invoke(app, ["train", "--train-file", str(tmp_path / "absent.jsonl"), *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output
