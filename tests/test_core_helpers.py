"""The one-home helpers of softprompt.core: the method vocabulary and the atomic write."""
from __future__ import annotations

import json
import os

import pytest

from softprompt.core import atomic
from softprompt.core.method import TRAINED, Method
from softprompt.core.prompt_meta import PromptMeta


def test_method_reads_every_spelling():
    for text in ("prompt", "prompt_tuning", "PROMPT_TUNING", "prompt-tuning"):
        assert Method.parse(text) is Method.PROMPT_TUNING
    assert Method.parse("ptuning") is Method.parse("P_TUNING") is Method.P_TUNING
    assert Method.parse("prefix") is Method.parse("prefix_tuning") is Method.PREFIX_TUNING
    assert [m.short for m in TRAINED] == ["prompt", "ptuning", "prefix"]
    assert Method.PREFIX_TUNING == "prefix_tuning" and json.dumps(Method.P_TUNING) == '"p_tuning"'
    assert Method.PROMPT_TUNING.name == "PROMPT_TUNING"  # PEFT's peft_type
    with pytest.raises(ValueError, match="unknown method 'lora'.*prompt, ptuning, prefix"):
        Method.parse("lora")
    assert Method.normalize("someday_method") == "someday_method"


def test_artifact_metadata_method_has_one_spelling():
    base = {"format_version": 1, "template": "{soft:2} {x}",
            "base_model": {"name": "m", "hidden_size": 4, "vocab_size": 9, "embedding_fingerprint": "f"}}
    assert PromptMeta.model_validate({**base, "method": "prefix"}).method == "prefix_tuning"
    assert PromptMeta.model_validate({**base, "method": "p_tuning"}).method == "p_tuning"
    assert PromptMeta.model_validate(base).method == "prompt_tuning"


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    atomic.write_json(path, {"a": [1, 2]}, indent=1, mode=0o644)
    assert json.loads(path.read_text()) == {"a": [1, 2]} and os.stat(path).st_mode & 0o777 == 0o644
    atomic.write_text(tmp_path / "t.md", "héllo")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "héllo"

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.write_atomic(path, boom)
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.md"]


def test_atomic_safetensors_is_byte_identical_to_save_file(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    tensors = {"prompt": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"k": "v"})
    atomic.write_safetensors(tmp_path / "b.safetensors", tensors, metadata={"k": "v"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_budget_chunks_cut_in_order_within_the_budget():
    from softprompt.core.conditioning import budget_chunks

    assert budget_chunks([3, 3, 3, 9, 1], 6) == [[0, 1], [2], [3], [4]]  # 9 > 6 stands alone
    assert budget_chunks([1, 1, 1], 0) == [[0], [1], [2]]  # a zero budget: one per group
    assert budget_chunks([], 5) == []
