"""softprompt: adapt frozen language models with soft prompts, and measure when a soft
prompt beats a hand-written one.

The public API, re-exported::

    model, tokenizer = load_model()                      # the embedded SmolLM2-135M-Instruct
    data = load_task("twitter_complaints")              # built-in task over ../shared/data
    result = train_with_recipe(model, tokenizer, data.task, data["train"], valid)  # the default recipe
    # (automatic learning rate with validation data; train_prompt + TrainConfig for full control)
    result.prompt.save("complaints.safetensors")
    bank = PromptBank(model, tokenizer); bank.add_prompt(result.prompt, "complaints")
    classify(bank, "complaints", data["test"]).metrics
"""
from .core.bank import PromptBank
from .families.encoder import EncoderBank
from .families import Family, UnsupportedError, family_for
from .families.loading import DEFAULT_MODEL, ModelNotAvailableError, freeze, list_models, load_model
from .core.prompts import ModelIdentity, PromptFileError, PromptMismatchError, SoftPrompt, init_embeddings
from .core.scoring import classification_metrics, classify, generate, qa_metrics
from .data import DataError, Example, Task, TaskData, from_hf_dataset, list_tasks, load_examples, load_task
from .core.templates import Template, TemplateError
from .training.prompt import TrainConfig, TrainResult, train_prompt
from .training.recipe import DEFAULT_RECIPE, Recipe
from .training.search import train_with_recipe

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "DEFAULT_RECIPE", "DataError", "EncoderBank", "Example", "Family", "ModelIdentity", "ModelNotAvailableError",
    "PromptBank",
    "PromptFileError", "PromptMismatchError", "Recipe", "SoftPrompt", "Task", "TaskData", "Template", "TemplateError",
    "TrainConfig", "TrainResult", "UnsupportedError", "classification_metrics", "classify", "family_for", "freeze",
    "from_hf_dataset",
    "generate", "init_embeddings", "list_models", "list_tasks", "load_examples", "load_model", "load_task",
    "qa_metrics", "train_prompt", "train_with_recipe",
]
