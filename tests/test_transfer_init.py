"""Transfer initialisation (``init="prompt:PATH"``): a new prompt starts from a saved prompt's soft
tokens, cut or cycled to its own length, and only when the saved prompt was trained for this model."""
import pytest
import torch

from softprompt.core.prompts import PromptMismatchError
from softprompt.data import Example, Task
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, initial_prompt, train_prompt

SOURCE = Task(name="src", kind="classification", template="{soft:4} review : {text} label :",
              verbalizer={"pos": " yes", "neg": " no"})
TRAIN = [Example({"text": t}, "pos") for t in ("good", "great film")] + [Example({"text": t}, "neg")
                                                                          for t in ("bad", "awful film")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    res = train_prompt(model, tok, SOURCE, TRAIN, None, TrainConfig(epochs=2, lr=0.1, batch_size=2, init="vocab"),
                       progress=False)
    path = tmp_path_factory.mktemp("src") / "source.safetensors"
    res.prompt.save(path)
    return model, tok, path, res.prompt.embeddings


@pytest.mark.parametrize("n", [2, 4, 6])
def test_transferred_start_has_the_right_shape_and_values(saved, n):
    model, tok, path, source = saved
    target = Task(name="tgt", kind="classification", template=f"{{soft:{n}}} text : {{text}} answer :",
                  verbalizer={"a": " yes", "b": " no"})
    start = initial_prompt(model, tok, target, TrainConfig(init=f"prompt:{path}"))
    assert start.shape == (n, source.shape[1])
    want = torch.cat([source, source])[:n]  # cut when shorter, cycled when longer
    assert torch.equal(start, want)


def test_training_from_a_transferred_start_begins_there(saved):
    model, tok, path, source = saved
    res = train_prompt(model, tok, SOURCE, TRAIN, None,
                       TrainConfig(epochs=1, lr=1e-12, batch_size=2, warmup_steps=0, init=f"prompt:{path}"),
                       progress=False)
    assert torch.allclose(res.prompt.embeddings, source, atol=1e-6)  # a vanishing step leaves the start in place
    assert res.prompt.training["init"] == f"prompt:{path}"


def test_a_prompt_for_another_model_is_refused(saved):
    _, tok, path, _ = saved
    other = tiny_causal_lm(seed=7)
    with pytest.raises(PromptMismatchError):
        initial_prompt(other, tok, SOURCE, TrainConfig(init=f"prompt:{path}"))
    with pytest.raises(FileNotFoundError):
        initial_prompt(other, tok, SOURCE, TrainConfig(init="prompt:/no/such/prompt.safetensors"))
