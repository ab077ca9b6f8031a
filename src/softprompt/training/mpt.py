"""Multitask prompt tuning (MPT, Wang et al. 2023): one shared prompt, times a low-rank matrix per task.

Why: a prompt shared by every task cannot hold what differs between them, and one prompt per task
shares nothing.  MPT's task prompt is ``P_k = P * (u_k @ v_k)`` (elementwise), with the shared
``P`` ``[n, d]`` and a rank-``r`` ``u_k`` ``[n, r]``, ``v_k`` ``[r, d]`` per task: the shared prompt
carries what the tasks have in common, a few numbers per task the rest.  ``u_k @ v_k`` starts at
all ones, so step 0 is the shared prompt for every task.

What is saved is the decomposition *multiplied out*: one plain prompt per task
(``OUT/prompt.<task>.safetensors``), so eval, serving and PEFT export (as prompt tuning) work
unchanged, plus the shared prompt (``OUT/prompt._shared.safetensors``, first task's template) as
the start for a new task (``init="prompt:PATH"``, the paper's target adaptation).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig, TrainResult
from .multitask import SHARED, MultiTaskTrainable, PromptSet, check_mixture, mixture

__all__ = ["MPTTrainable", "train_mpt"]


class MPTTrainable(MultiTaskTrainable):
    """:class:`MultiTaskTrainable` whose task ``k`` sees ``P * (u_k @ v_k)``."""

    def __init__(self, model, tokenizer, tasks, train_examples, cfg: TrainConfig, rank: int = 1, **kw):
        super().__init__(model, tokenizer, tasks, train_examples, cfg, **kw)
        if rank < 1:
            raise ValueError(f"MPT's rank must be >= 1, got {rank}")
        n, d = self.trained.values()["prompt"].shape
        device = self.trained.values()["prompt"].device
        self.rank = rank
        self.u = nn.Parameter(torch.ones(len(tasks), n, rank, device=device))
        self.v = nn.Parameter(torch.full((len(tasks), rank, d), 1.0 / rank, device=device))
        self.description = "MPT " + self.description

    def param_groups(self) -> list[dict]:
        return [{"params": [*self.trained.parameters().values(), self.u, self.v]}]

    def state(self) -> dict[str, torch.Tensor]:
        return {**self.trained.state(), "mpt.u": self.u, "mpt.v": self.v}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.trained.load_state({k: v for k, v in tensors.items() if not k.startswith("mpt.")})
        self.u.copy_(tensors["mpt.u"])
        self.v.copy_(tensors["mpt.v"])

    def task_prompts(self) -> list[torch.Tensor]:
        """Each task's prompt, ``P * (u_k @ v_k)`` (differentiable)."""
        shared = self.trained.values()["prompt"]
        return [shared * (self.u[k] @ self.v[k]) for k in range(len(self.tasks))]

    def _put(self) -> None:
        prompts = self.task_prompts()
        self.entries = [self.bank.add(t.name, t.template, p, verbalizer=t.verbalizer, kind=t.kind)
                        for t, p in zip(self.tasks, prompts)]
        self.values, self.entry = {"prompt": self.trained.values()["prompt"]}, self.entries[0]

    def condition(self) -> None:
        self._put()  # u and v moved: every task's prompt changes each step

    def snapshot(self) -> dict[str, torch.Tensor]:
        out = {f"prompt.{t.name}": p.detach().clone() for t, p in zip(self.tasks, self.task_prompts())}
        out[f"prompt.{SHARED}"] = self.trained.values()["prompt"].detach().clone()
        return out

    def finish(self, final: dict[str, torch.Tensor], summary: dict) -> PromptSet:
        prompts = {}
        for t in [*self.tasks, None]:
            name = t.name if t is not None else SHARED
            self.task = t if t is not None else self.tasks[0]
            p = super(MultiTaskTrainable, self).finish({"prompt": final[f"prompt.{name}"]}, summary)
            p.training = {**p.training, "multitask": [x.name for x in self.tasks], "mpt_rank": self.rank}
            if t is None:
                p.task = SHARED
            prompts[name] = p
        self.task = self.tasks[0]
        return PromptSet(prompts)


def train_mpt(model, tokenizer, tasks, train, valid=None, cfg: TrainConfig | None = None, *, rank: int = 1,
              sampling: str = "proportional", temperature: float = 2.0, out_dir=None, resume: bool = False,
              progress: bool = True) -> TrainResult:
    """Train an MPT prompt on the mixture of ``tasks``; ``result.prompt`` is a :class:`PromptSet`
    of multiplied-out task prompts and the shared one."""
    from .loop import fit

    cfg = cfg or TrainConfig()
    held = check_mixture(model, tasks, train, valid, cfg)
    pool = mixture(train, sampling, temperature, cfg.seed)
    trainable = MPTTrainable(model, tokenizer, tasks, pool, cfg, rank=rank)
    return fit(trainable, pool, held, cfg, out_dir=out_dir, resume=resume, progress=progress)
