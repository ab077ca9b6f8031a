"""The compiled ``full`` step (compiled.py) computes what eager computes.

Compiling is slow on a small CPU, so one tiny Llama and ONE compiled function serve the whole
module, and every compiled call uses the same batch size and length bucket (one graph)."""
import contextlib
import warnings

import pytest
import torch

from softprompt.core import compiled
from softprompt.core.bank import PromptBank
from softprompt.core.compiled import bucketed, full_forward, resolve_compile
from softprompt.core.conditioning import full_context, label_logprobs
from softprompt.core.scoring import classify
from softprompt.data import Example
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = "{soft:3} review : {text} {soft:2} label :"
VERBALIZER = {"pos": " good", "neg": " not good"}  # a multi-token label word: the lane pass runs too
TEXTS = ["the movie was good", "awful service , slow flight", "great", "why is my refund delayed"]
LABELS = ["pos", "neg", "pos", "neg"]


@pytest.fixture(scope="module")
def model_tok():
    return tiny_causal_lm("llama"), tiny_tokenizer()


def _bank(model_tok, seed=0):
    model, tok = model_tok
    soft = torch.nn.Parameter(torch.randn(5, 32, generator=torch.Generator().manual_seed(seed)))
    bank = PromptBank(model, tok)
    entry = bank.add("t", TEMPLATE, soft, verbalizer=VERBALIZER)
    return bank, entry, soft


def _loss_and_grad(model_tok, compile):
    bank, entry, soft = _bank(model_tok)
    exs = [Example({"text": t}, label=lab) for t, lab in zip(TEXTS, LABELS)]
    loss, n = batch_loss(bank, entry, exs, "rank", context="full", compile=compile)
    loss.backward()
    return loss.detach(), soft.grad.clone(), n


@pytest.fixture(scope="module")
def eager_and_compiled(model_tok):
    return _loss_and_grad(model_tok, False), _loss_and_grad(model_tok, True)


def test_compiled_step_gives_the_eager_loss_and_gradient(eager_and_compiled):
    from torch._dynamo.utils import counters

    (loss_e, grad_e, n_e), (loss_c, grad_c, n_c) = eager_and_compiled
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled path really ran through dynamo
    assert grad_e.abs().sum() > 0
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_c, grad_e, atol=1e-5, rtol=1e-4)
    assert n_c == n_e


def test_compiled_label_scores_equal_eager_cached_scores(model_tok):
    bank, entry, _ = _bank(model_tok)
    exs = [Example({"text": t}, label=lab) for t, lab in zip(TEXTS, LABELS)]
    with torch.no_grad():
        eager = classify(bank, entry, exs, batch_size=4, compile="off")  # the reference: cached context
        comp = classify(bank, entry, exs, batch_size=4, compile="on")
    torch.testing.assert_close(comp.scores, eager.scores, atol=1e-5, rtol=1e-5)
    assert comp.predictions == eager.predictions


def test_bucketed_padding_equals_unpadded(model_tok):
    """Right padding up to a bucket changes no real position's hidden state or key/values."""
    bank, entry, _ = _bank(model_tok)
    suffixes = [bank.suffix_ids(entry, {"text": t}) for t in TEXTS[:3]]
    idx = torch.full((3,), entry)
    plain = full_context(bank, idx, suffixes)
    seqs = [bank.entries[entry].prefix_ids + s for s in suffixes]
    width = plain.mask.shape[1]
    embeds = bank.embed(*_ids(seqs, width), idx)
    mask = plain.mask
    pos = torch.arange(width)[None].expand(3, -1)
    hidden, layers, pmask = full_forward(bank.model, embeds, mask, pos, compile=False, bucket=16)
    assert pmask.shape[1] == bucketed(width, 16) > width and not pmask[:, width:].any()
    real = mask.bool()
    ref_hidden, ref_layers, _ = full_forward(bank.model, embeds, mask, pos, compile=False)
    torch.testing.assert_close(hidden[:, :width][real], ref_hidden[real], atol=1e-5, rtol=1e-5)
    for (k, v), (rk, rv) in zip(layers, ref_layers):
        torch.testing.assert_close(k[:, :, :width].transpose(1, 2)[real], rk.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[:, :, :width].transpose(1, 2)[real], rv.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
    ref = torch.stack(label_logprobs(bank, plain))
    padded = torch.stack(label_logprobs(bank, _ctx_like(plain, hidden, layers, pmask)))
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)


def _ids(seqs, width):
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return (ids,)


def _ctx_like(ctx, hidden, layers, mask):
    from softprompt.core.conditioning import Context

    last = hidden[torch.arange(hidden.shape[0]), ctx.next_pos - 1]
    return Context(layers=layers, mask=mask, next_pos=ctx.next_pos, last_hidden=last, entry_idx=ctx.entry_idx)


def test_a_smaller_batch_reuses_the_graph_and_gives_the_eager_scores(model_tok, eager_and_compiled):
    """3 rows are padded to 4 (bucketed_rows): the compiled graph of the 4-row batches serves them,
    and the padded row changes no real row's scores."""
    from torch._dynamo.utils import counters

    bank, entry, _ = _bank(model_tok)
    exs = [Example({"text": t}, label=lab) for t, lab in zip(TEXTS[:3], LABELS[:3])]
    with torch.no_grad():
        comp = classify(bank, entry, exs, batch_size=4, compile="on")  # warm: the 4-row graph exists
        graphs = counters["stats"]["unique_graphs"]
        comp = classify(bank, entry, exs, batch_size=4, compile="on")
        eager = classify(bank, entry, exs, batch_size=4, compile="off")
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(comp.scores, eager.scores, atol=1e-5, rtol=1e-5)


def test_padded_rows_change_no_real_row(model_tok):
    bank, entry, _ = _bank(model_tok)
    seqs = [bank.entries[entry].prefix_ids + bank.suffix_ids(entry, {"text": t}) for t in TEXTS[:3]]
    width = max(map(len, seqs))
    (ids,) = _ids(seqs, width)
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    embeds = bank.embed(ids, torch.full((3,), entry))
    pos = torch.arange(width)[None].expand(3, -1)
    pe, pm, pp = compiled.pad_rows(embeds, mask, pos, 8)
    assert pe.shape[0] == pm.shape[0] == pp.shape[0] == 8 and pm[3:, 0].all() and not pm[3:, 1:].any()
    with torch.no_grad():
        ref, _ = compiled._forward(bank.model.base_model, embeds, mask, pos)
        padded, _ = compiled._forward(bank.model.base_model, pe, pm, pp)
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:3][mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    m4 = torch.zeros(3, 1, width, width)
    assert compiled.pad_rows(embeds, m4, pos, 4)[1][3].eq(0).all()  # 4D additive: the padded row sees itself


def test_bucketed_rows():
    assert [compiled.bucketed_rows(n) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 24]
    with pytest.raises(ValueError):
        compiled.bucketed_rows(0)


def test_bucketed_rounds_up_to_a_multiple():
    assert [bucketed(n, 16) for n in (1, 16, 17, 33)] == [16, 16, 32, 48]
    with pytest.raises(ValueError, match="bucket"):
        bucketed(5, 0)


def test_compile_modes(monkeypatch):
    monkeypatch.delenv(compiled.COMPILE_ENV_VAR, raising=False)  # the suite may run with it set
    assert resolve_compile("auto", "cpu") is False and resolve_compile("auto", "cuda") is True
    assert resolve_compile("on", "cpu") is True and resolve_compile("off", "cuda") is False
    assert resolve_compile(None, "cpu") is False and resolve_compile(True, "cpu") is True
    with pytest.raises(ValueError, match="compile must be one of"):
        resolve_compile("yes", "cpu")
    assert TrainConfig().compile == "auto"


def test_compile_env_sets_what_auto_means(monkeypatch):
    monkeypatch.setenv(compiled.COMPILE_ENV_VAR, "on")
    assert resolve_compile("auto", "cpu") is True and resolve_compile("off", "cpu") is False
    monkeypatch.setenv(compiled.COMPILE_ENV_VAR, "off")
    assert resolve_compile("auto", "cuda") is False and resolve_compile("on", "cuda") is True
    monkeypatch.setenv(compiled.COMPILE_ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="SOFTPROMPT_COMPILE"):
        resolve_compile("auto", "cpu")


def test_one_compiled_function_per_model(model_tok):
    model, _ = model_tok
    assert compiled.compiled_forward(model) is compiled.compiled_forward(model)
    assert compiled.compiled_forward(model, True) is not compiled.compiled_forward(model)


def test_train_cli_rejects_a_bad_compile_mode():
    from typer.testing import CliRunner

    from softprompt.cli import app

    r = CliRunner().invoke(app, ["train", "--task", "sst2", "--compile", "maybe"])
    assert r.exit_code != 0 and "compile must be one of" in r.output


def test_bf16_autocast_keeps_the_trainable_tensors_loss_and_scores_in_fp32(model_tok, monkeypatch):
    """The CUDA path's bf16 autocast, run on the CPU: the frozen forward in bf16, what it hands
    back cast to fp32, so the loss, the soft prompt's gradient and the label scores are fp32 and
    close to the fp32 numbers (bf16 rounding)."""
    monkeypatch.setattr(compiled, "autocast_for", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    bank, entry, soft = _bank(model_tok)
    exs = [Example({"text": t}, label=lab) for t, lab in zip(TEXTS, LABELS)]
    loss, _ = batch_loss(bank, entry, exs, "rank", context="full")
    loss.backward()
    assert loss.dtype == soft.grad.dtype == torch.float32 and soft.grad.abs().sum() > 0
    with torch.no_grad():
        bf16 = classify(bank, entry, exs, batch_size=4, context="full", compile="off").scores
    monkeypatch.undo()
    ref_bank, ref_entry, ref_soft = _bank(model_tok)
    ref_loss, _ = batch_loss(ref_bank, ref_entry, exs, "rank", context="full")
    ref_loss.backward()
    with torch.no_grad():
        ref = classify(ref_bank, ref_entry, exs, batch_size=4, context="full", compile="off").scores
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, ref)  # bf16 really ran
    torch.testing.assert_close(bf16, ref, atol=0.1, rtol=0.05)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=0.05, rtol=0.05)
    assert torch.nn.functional.cosine_similarity(soft.grad.flatten(), ref_soft.grad.flatten(), dim=0) > 0.95


def test_autocast_env(monkeypatch):
    """bf16 autocast on CUDA unless SOFTPROMPT_AUTOCAST=off (the fp32 benchmark rows); never on a CPU."""
    cuda = torch.device("cuda")  # only the context manager is built: no CUDA needed
    monkeypatch.delenv(compiled.AUTOCAST_ENV_VAR, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" where it is not
        assert isinstance(compiled.autocast_for(cuda), torch.autocast)
    assert isinstance(compiled.autocast_for(torch.device("cpu")), contextlib.nullcontext)
    monkeypatch.setenv(compiled.AUTOCAST_ENV_VAR, "off")
    assert isinstance(compiled.autocast_for(cuda), contextlib.nullcontext)
    monkeypatch.setenv(compiled.AUTOCAST_ENV_VAR, "fp8")
    with pytest.raises(ValueError, match="SOFTPROMPT_AUTOCAST"):
        compiled.autocast_for(torch.device("cpu"))
