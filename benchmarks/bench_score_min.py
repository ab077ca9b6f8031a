"""Rank-classification wall time on a busy machine: the minimum over repeats of scoring the first 96
RAFT test tweets with one 20-token prompt (random soft tokens), one torch thread.  The minimum of a few
repeats is robust to other jobs' load, so two code versions can be compared by running this from each
tree one after the other (docs/benchmarks.md, issue 13).

    PYTHONPATH=src python benchmarks/bench_score_min.py 3
"""
import sys, time, torch
torch.set_num_threads(1)
from softprompt import PromptBank, load_model, load_task, classify
model, tok = load_model()
data = load_task("twitter_complaints"); t = data.task
bank = PromptBank(model, tok)
soft = torch.randn(20, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.01
bank.add("p", t.template, soft, verbalizer=t.verbalizer)
exs = data["test"][:96]
ts = []
for _ in range(int(sys.argv[1])):
    s = time.perf_counter(); classify(bank, "p", exs, batch_size=32); ts.append(time.perf_counter() - s)
print("min_s", round(min(ts), 3), "all", [round(x, 2) for x in ts])
