"""Reparameterised prompts: trained tensors produced by a small network, kept as plain tensors.

Two published methods train a prompt *through* a network instead of directly:

* **P-tuning** (Liu et al. 2021, "GPT Understands, Too"): the soft tokens are the output of
  a prompt encoder, an MLP or a bidirectional LSTM followed by an MLP, run over a small
  trainable input embedding.  The LSTM ties neighbouring soft tokens together, which the
  paper reports makes optimisation less brittle than training each token on its own.
* **Prefix tuning with an MLP** (Li & Liang 2021): the per-layer key/values are the output
  of an MLP over a small embedding, which they found necessary for stable training.

In both the network only matters while training: once trained, its output is a fixed
tensor.  So a :class:`PromptEncoder` is *materialised* when the prompt is saved, and the
artifact holds plain ``[n_tokens, hidden]`` embeddings or ``[L, 2, kv_heads, P, head_dim]``
key/values, exactly what direct training produces; loading, serving and evaluation need to
know nothing about encoders.

Design choice: the encoder's output is added to the usual starting values (``base``, from
``init`` = labels / vocab / text / random) and its last layer starts at zero, so step 0
equals the direct method's step 0 and only the path the updates take differs.  A real
model's embeddings have a scale of their own; starting from them rather than from whatever
a random network emits keeps the first steps on the model's input manifold.

Learning rate: on an Adam step every weight of the encoder's last layer moves its output
the same way, so an output number moves by about ``lr`` times the summed activations
feeding that layer, not by ``lr``.  Measured at width 128 over the first steps: about 15x
lr for the MLP, 4x for the LSTM (smaller activations), growing as the lower layers move.
Hence lr ~1e-3 for an encoder where a prompt trained directly uses ~0.03.
"""
from __future__ import annotations

import math

import torch
from torch import nn

ENCODERS = ("mlp", "lstm")


class PromptEncoder(nn.Module):
    """``base + encoder(inputs)``: a tensor whose ``token_axis`` has one row per prompt position.

    ``inputs`` is a trainable ``[n, hidden]`` embedding (one small vector per position).  With
    ``encoder="lstm"`` it first goes through a two-layer bidirectional LSTM (``hidden / 2``
    units each way); then a two-layer MLP maps each position to the ``base.numel() / n``
    numbers of its slice of ``base``.  Parameters are drawn from ``seed`` without touching
    the global random state, so a run is reproducible whoever builds it.
    """

    def __init__(self, base: torch.Tensor, token_axis: int = 0, *, encoder: str = "mlp", hidden: int = 128,
                 seed: int = 0):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"unknown prompt encoder {encoder!r}; use one of {', '.join(ENCODERS)}")
        if hidden < 2 or (encoder == "lstm" and hidden % 2):
            raise ValueError(f"encoder hidden size must be an even number >= 2 (got {hidden}): "
                             "the bidirectional LSTM gives each direction half of it")
        token_axis = token_axis % base.ndim
        n = int(base.shape[token_axis])
        if n == 0:
            raise ValueError("nothing to reparameterise: the tensor has no prompt positions")
        self.encoder, self.hidden, self.token_axis = encoder, hidden, token_axis
        self.register_buffer("base", base.detach().to(torch.float32).clone())
        self._rest = [s for i, s in enumerate(base.shape) if i != token_axis]  # one position's slice
        width = math.prod(self._rest)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.inputs = nn.Parameter(torch.randn(n, hidden))
            self.lstm = (nn.LSTM(hidden, hidden // 2, num_layers=2, bidirectional=True, batch_first=True)
                         if encoder == "lstm" else None)
            self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, width))
        nn.init.zeros_(self.mlp[-1].weight)  # start exactly at ``base``
        nn.init.zeros_(self.mlp[-1].bias)
        self.to(base.device)

    @property
    def n_positions(self) -> int:
        return int(self.inputs.shape[0])

    def forward(self) -> torch.Tensor:
        x = self.inputs
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]
        delta = self.mlp(x).view(self.n_positions, *self._rest).movedim(0, self.token_axis)
        return self.base + delta

    def materialise(self) -> torch.Tensor:
        """The current output as a plain float32 CPU tensor (what a saved prompt stores).

        Computed with autograd on, as in training: the LSTM's inference kernel rounds
        differently in the last bit, and the artifact must equal what was trained."""
        with torch.enable_grad():
            return self().detach().to("cpu", torch.float32).clone()

    def describe(self) -> dict:
        """For the saved prompt's training metadata."""
        return {"encoder": self.encoder, "hidden": self.hidden,
                "params": sum(p.numel() for p in self.parameters())}


class PromptTensors:
    """The named tensors one training run optimises (``"prompt"``: soft tokens, ``"kv"``:
    prefix key/values), each trained either directly, as an ``nn.Parameter``, or through a
    :class:`PromptEncoder`.

    * :meth:`parameters` - what the optimizer steps, with stable flat names;
    * :meth:`state` - parameters and encoder buffers, what a checkpoint stores;
    * :meth:`values` - the tensors the model is conditioned on, differentiable.

    For direct training ``values()["prompt"]`` *is* the parameter and the checkpoint names
    are just ``"prompt"`` / ``"kv"``; encoded tensors add ``"prompt.inputs"``, ... .
    """

    def __init__(self, start: dict[str, torch.Tensor], encoders: dict[str, tuple[str, int]] | None = None, *,
                 hidden: int = 128, seed: int = 0):
        """``start``: starting values by name; ``encoders``: name -> (encoder kind, token axis)
        for the tensors trained through a network (the others are trained directly)."""
        encoders = encoders or {}
        unknown = set(encoders) - set(start)
        if unknown:
            raise ValueError(f"encoders given for {sorted(unknown)} but no such tensors; have {sorted(start)}")
        self.sources: dict[str, nn.Parameter | PromptEncoder] = {}
        for name, value in start.items():
            if name in encoders:
                kind, axis = encoders[name]
                self.sources[name] = PromptEncoder(value, axis, encoder=kind, hidden=hidden, seed=seed)
            else:
                self.sources[name] = nn.Parameter(value.detach().to(torch.float32).clone())

    @property
    def reparameterised(self) -> bool:
        return any(isinstance(s, PromptEncoder) for s in self.sources.values())

    def parameters(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for name, src in self.sources.items():
            if isinstance(src, PromptEncoder):
                out.update({f"{name}.{k}": p for k, p in src.named_parameters()})
            else:
                out[name] = src
        return out

    def state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = dict(self.parameters())
        for name, src in self.sources.items():
            if isinstance(src, PromptEncoder):
                out.update({f"{name}.{k}": b for k, b in src.named_buffers()})
        return out

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's tensors in place (the optimizer keeps pointing at the same parameters)."""
        for k, t in self.state().items():
            if k not in tensors:
                raise ValueError(f"checkpoint has no tensor {k!r}; was it written by a run with another method?")
            t.copy_(tensors[k])

    def values(self) -> dict[str, torch.Tensor]:
        return {name: src() if isinstance(src, PromptEncoder) else src for name, src in self.sources.items()}

    def describe(self) -> dict:
        return {name: src.describe() for name, src in self.sources.items() if isinstance(src, PromptEncoder)}
