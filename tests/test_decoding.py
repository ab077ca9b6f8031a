"""The one greedy loop (core/decoding.py): its row rules on a scripted step, and the server
answering token for token as the library (scoring.generate) on the same prompts."""
import pytest
import torch

from softprompt.core.bank import PromptBank
from softprompt.core.decoding import Row, greedy_loop
from softprompt.core.scoring import generate as ref_generate
from softprompt.data import Example
from softprompt.serve.engine import Engine
from softprompt.serve.testing import random_prompt
from softprompt.testing import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

V = 10


def scripted(scripts: list[list[int]]):
    """First logits and a step that emit ``scripts[i][k]`` as row i's k-th token, tracking which
    rows the loop keeps in the batch (so dropping the wrong row shows as wrong tokens)."""
    live = list(range(len(scripts)))
    k = [0] * len(scripts)
    batch_sizes = []

    def logits():
        out = torch.zeros(len(live), V)
        for j, i in enumerate(live):
            out[j, scripts[i][min(k[i], len(scripts[i]) - 1)]] = 1.0
        return out

    def step(tokens, keep):
        nonlocal live
        if keep is not None:
            live = [live[j] for j in keep]
        assert tokens.shape[0] == len(live)
        batch_sizes.append(len(live))
        for i in live:
            k[i] += 1
        return logits()

    return logits(), step, batch_sizes


SCRIPTS = [[1, 2, 9, 3], [4, 4, 4, 4, 4, 4], [9, 5, 6, 9], [7, 1, 1, 9]]  # 9: a stop, 7: a leading line break


@pytest.mark.parametrize("leave_at", [0.0, 0.25, 0.5, None])
def test_rows_get_the_same_tokens_whenever_finished_rows_leave(leave_at):
    first, step, sizes = scripted(SCRIPTS)
    rows = [Row(5, {9}, {7}) for _ in SCRIPTS]
    greedy_loop(first, step, rows, leave_at=leave_at)
    assert [r.tokens for r in rows] == [[1, 2], [4, 4, 4, 4, 4], [], [1, 1]]
    assert [r.finish for r in rows] == ["stop", "length", "stop", "stop"]
    assert [r.used for r in rows] == [3, 5, 1, 4]  # the skipped 7 counts towards the budget
    assert len(sizes) == 4, "no step once every row finished"
    if leave_at is None:
        assert sizes == [4, 4, 4, 4]
    elif leave_at == 0.0:
        assert sizes == [3, 3, 2, 1]


def test_budgets_stop_strings_streaming_abandonment_and_finish_order():
    first, step, _ = scripted(SCRIPTS)
    rows = [Row(2, {9}), Row(6, {9}), Row(0, {9}), Row(2, set(), {7})]
    streamed, finished, gone = [], [], set()

    def on_token(i, row):
        streamed.append((i, list(row.tokens)))
        if i == 1 and len(row.tokens) == 2:
            gone.add(1)  # the client leaves: the row ends before its next token
        return i == 3 and row.tokens[-1] == 1  # a stop string in row 3's text

    greedy_loop(first, step, rows, leave_at=0.25, on_token=on_token, abandoned=gone.__contains__,
                on_finish=finished.append)
    assert [r.tokens for r in rows] == [[1, 2], [4, 4], [], [1]]
    assert [r.finish for r in rows] == ["length", "abandoned", "length", "stop"]  # a stop string beats the budget
    assert [r.used for r in rows] == [2, 2, 0, 2]
    assert finished == [2, 0, 3, 1]
    assert streamed == [(0, [1]), (1, [4]), (0, [1, 2]), (1, [4, 4]), (3, [1])]


def test_the_server_answers_as_the_library():
    """Per-row limits and stops in one server batch; each row's text equals scoring.generate's
    (the library's batched greedy_generate) for the same prompt, limit and stop rule."""
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    qa = random_prompt(model, "{soft:4} question : {text} answer :", kind="generation", seed=3)
    texts = ["the movie was good", "why is my refund delayed please help", "help", "what a slow , broken service"]
    bank = PromptBank(model, tok)
    entry = bank.add_prompt(qa, "qa")
    cases = [(n, nl) for n in (3, 9) for nl in (True, False)]
    want = {(n, nl): ref_generate(bank, entry, [Example({"text": t}) for t in texts], max_new_tokens=n,
                                  stop_at_newline=nl).texts for n, nl in cases}
    with Engine(model, tok, max_wait_ms=50) as eng:
        eng.register("qa", qa)
        futs = {(n, nl): [eng.submit_generate("qa", t, max_new_tokens=n, stop_at_newline=nl) for t in texts]
                for n, nl in cases}
        got = {c: [f.result(60).text for f in fs] for c, fs in futs.items()}
    assert got == want
