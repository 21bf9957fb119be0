"""The ``SAE`` module: encode, decode and forward for every supported architecture.

Semantics follow SAELens 6 (the names, shapes and hook points are its own), re-implemented:

- input:  ``x' = normalize(x) - b_dec * apply_b_dec_to_input``;
- encode: ``pre = x' @ W_enc + b_enc``, then per architecture
  ``standard``/transcoders: ``relu(pre)``; ``topk``: the k largest of ``pre`` per token, ReLU'd;
  ``batchtopk``: the ``k * tokens`` largest over the whole batch (training; saved as ``jumprelu``);
  ``jumprelu``: ``relu(pre) * (pre > threshold)``;
- decode: ``acts @ W_dec + b_dec`` (+ ``x @ W_skip.T`` for a skip transcoder), de-normalized.

Hook points (``HookPoint`` modules, so they become hook names while spliced): ``hook_sae_input``,
``hook_sae_acts_pre``, ``hook_sae_acts_post``, ``hook_sae_recons``, ``hook_sae_error``,
``hook_sae_output``. ``use_error_term=True`` adds ``x - recons`` back, so the output is exactly ``x``
unless a hook changed something inside the dictionary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from interp.errors import InputError
from interp.hooks import HookPoint
from interp.sae.config import SAEConfig

HOOK_POINTS = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise InputError(f"SAE cfg dtype {name!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'")
    return value


class SAE(nn.Module):
    """A sparse autoencoder or transcoder with SAELens's parameters and hook points.

    Args:
        cfg: an ``SAEConfig`` (or a dict of its fields / a ``cfg.json`` dict).
        use_error_term: when spliced, add back what the dictionary misses (the model's output is
            then unchanged unless a hook edits the latents).

    Parameters: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc [d_sae]``,
    ``b_dec [d_out]``; ``threshold [d_sae]`` for JumpReLU (and BatchTopK's inference threshold);
    ``W_skip [d_out, d_in]`` for skip transcoders. ``d_out = d_in`` except for transcoders.
    """

    def __init__(self, cfg: SAEConfig | dict[str, Any], *, use_error_term: bool = False) -> None:
        super().__init__()
        self.cfg = cfg if isinstance(cfg, SAEConfig) else SAEConfig.from_dict(cfg)
        self.use_error_term = use_error_term
        c, dtype = self.cfg, _dtype(self.cfg.dtype)
        kw = {"dtype": dtype, "device": c.device}
        self.W_enc = nn.Parameter(torch.zeros(c.d_in, c.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(c.d_sae, c.width_out, **kw))
        self.b_enc = nn.Parameter(torch.zeros(c.d_sae, **kw))
        self.b_dec = nn.Parameter(torch.zeros(c.width_out, **kw))
        if c.architecture in ("jumprelu", "batchtopk"):
            self.threshold = nn.Parameter(
                torch.zeros(c.d_sae, **kw), requires_grad=c.architecture == "jumprelu"
            )
        if c.architecture == "skip_transcoder":
            self.W_skip = nn.Parameter(torch.zeros(c.width_out, c.d_in, **kw))
        for name in HOOK_POINTS:
            setattr(self, name, HookPoint())
        self.eval()  # inference by default (BatchTopK's batch-level top-k is a training-time rule)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def init(cls, cfg: SAEConfig, *, seed: int = 0, **kw: Any) -> SAE:
        """Random initialisation used for training: Kaiming-uniform ``W_dec`` rows of unit norm,
        ``W_enc = W_decᵀ``, zero biases (the usual SAE recipe), from a seeded generator."""
        sae = cls(cfg, **kw)
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(cfg.d_in)
        w = (torch.rand(cfg.d_sae, cfg.width_out, generator=gen) * 2 - 1) * bound
        w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            sae.W_dec.copy_(w)
            if cfg.width_out == cfg.d_in:
                sae.W_enc.copy_(w.T)
            else:
                enc = (torch.rand(cfg.d_in, cfg.d_sae, generator=gen) * 2 - 1) * bound
                sae.W_enc.copy_(enc)
        return sae

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    # --- normalisation ------------------------------------------------------------------------

    def _normalize_in(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            scale = math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * scale, scale
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            centred = x - mu
            std = centred.std(dim=-1, keepdim=True)  # unbiased, and eps added to std: SAELens's rule
            return centred / (std + 1e-5), (mu, std)
        return x, None  # "none"; "expected_average_only_in" is folded into the weights at inference

    def _normalize_out(self, y: torch.Tensor, state: Any) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return y / state
        if mode == "layer_norm":
            mu, std = state
            return y * std + mu
        return y

    # --- the computation ----------------------------------------------------------------------

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            where = f" at {self.cfg.hook_name}" if self.cfg.hook_name else ""
            raise InputError(
                f"this SAE{where} reads activations of width d_in={self.cfg.d_in}, got width {x.shape[-1]} "
                f"(shape {tuple(x.shape)}). Use a dictionary trained on this hook, or the hook it was trained on."
            )

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """``hook_z`` dictionaries read ``[..., head, d_head]`` as ``[..., head * d_head]``; else ``x``."""
        z = self.cfg.reshape_activations == "hook_z" and x.ndim >= 2 and x.shape[-1] != self.cfg.d_in
        return x.flatten(-2) if z and x.shape[-1] * x.shape[-2] == self.cfg.d_in else x

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x'``: ``x`` flattened, checked, normalized and (``apply_b_dec_to_input``) minus ``b_dec``."""
        x = self.flat(x)
        self._check_width(x)
        x, _ = self._normalize_in(x.to(self.dtype))
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``(x' ) @ W_enc + b_enc`` before the activation function (no hooks run)."""
        pre = self._encoder_input(x) @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """The architecture's nonlinearity on pre-activations ``[..., d_sae]``."""
        arch = self.cfg.architecture
        if arch == "topk":
            return _topk(pre, self.cfg.k)
        if arch == "batchtopk":
            return self._batch_topk(pre) if self.training else _jump(pre, self.threshold)
        if arch == "jumprelu":
            return _jump(pre, self.threshold)
        return torch.relu(pre)

    def _batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(pre)
        flat = acts.reshape(-1)
        keep = min(flat.numel(), int(self.cfg.k * (flat.numel() // self.cfg.d_sae)))
        values, index = flat.topk(keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, index, values).reshape(acts.shape)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` for activations ``[..., d_in]`` (runs the encode hooks)."""
        x = self.hook_sae_input(self.flat(x))
        pre = self.hook_sae_acts_pre(self.pre_acts(x))
        return self.hook_sae_acts_post(self.activation(pre))

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction from latents: ``acts @ W_dec + b_dec``, hooked at ``hook_sae_recons``, then
        de-normalized with ``x``'s statistics (run-time normalizations need the input ``x``).

        As in SAELens, a transcoder's output is not de-normalized, and a skip transcoder's skip
        term ``x @ W_skip.T`` is added by ``forward``/``reconstruct``, not here.
        """
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        recons = self.hook_sae_recons(acts @ self.W_dec + self.b_dec)
        return self._denormalize(recons, x)

    def _denormalize(self, out: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.is_transcoder or self.cfg.normalize_activations in ("none", "expected_average_only_in"):
            return out
        if x is None:
            raise InputError(
                f"decode needs the input x to undo normalize_activations={self.cfg.normalize_activations!r}: "
                "call decode(acts, x)"
            )
        _, state = self._normalize_in(x.to(self.dtype))
        return self._normalize_out(out, state)

    def _skip(self, x: torch.Tensor) -> torch.Tensor | float:
        if self.cfg.architecture == "skip_transcoder":
            return x.to(self.dtype) @ self.W_skip.T
        return 0.0

    def splice_into(self, model: Any, saes: Sequence[SAE], *, use_error_term: bool | None = None) -> Any:
        """The splice behind ``model.saes(saes)``: a context manager (see ``interp.sae.splicing``)."""
        from interp.sae.splicing import splice

        return splice(model, saes, use_error_term=use_error_term)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """What the dictionary predicts for ``x``, with no hooks and no error term (flat for hook_z)."""
        x = self.flat(x)
        acts = self.activation(self.pre_acts(x))
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        out = self._denormalize(acts @ self.W_dec + self.b_dec, x)
        return out + self._skip(x)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction of ``x`` (for a transcoder: its prediction of ``target``).

        With ``use_error_term``, the output is ``recons + (target - clean recons)``: exactly
        ``target`` (``x`` for an SAE) when no hook changed anything inside, and the edited
        reconstruction plus the unchanged error otherwise. Gradients flow as through
        ``recons + error`` either way (to ``x`` and to the latents).
        """
        goal_in = x if target is None else target
        x = self.flat(x)
        target = None if target is None else self.flat(target)
        flat_goal = x if target is None else target
        shape = goal_in.shape if flat_goal is not goal_in else None  # hook_z: give heads back
        x_in = self.hook_sae_input(x)
        pre = self.pre_acts(x_in)
        pre_h = self.hook_sae_acts_pre(pre)
        act = self.activation(pre_h)
        act_h = self.hook_sae_acts_post(act)
        recons = self.decode(act_h, x_in) + self._skip(x_in)  # runs hook_sae_recons
        if not self.use_error_term:
            return _shaped(self.hook_sae_output(recons), shape)
        goal = x if target is None else target
        goal = goal.to(recons.dtype)
        untouched = x_in is x and pre_h is pre and act_h is act
        if untouched:
            clean = recons.detach()
        else:
            with torch.no_grad():
                clean = self.reconstruct(x)
        error = goal - clean
        error_h = self.hook_sae_error(error)
        # Untouched: exactly ``goal``, with the gradients of recons + error. Else the edited sum.
        out = goal + (recons - recons.detach()) if untouched and error_h is error else recons + error_h
        return _shaped(self.hook_sae_output(out), shape)

    # --- helpers for tools ----------------------------------------------------------------------

    def decoder_direction(self, latent: int) -> torch.Tensor:
        """Row ``latent`` of ``W_dec``: what adding one unit of the latent adds at the output hook."""
        if not 0 <= latent < self.cfg.d_sae:
            raise InputError(f"latent {latent} is out of range for d_sae={self.cfg.d_sae}")
        return self.W_dec[latent].detach()

    def save(self, directory: Any) -> Any:
        """Write SAELens's format (``cfg.json`` + ``sae_weights.safetensors``); see ``interp.sae.io``."""
        from interp.sae.io import save

        return save(self, directory)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, hook={c.hook_name!r}"


def _shaped(out: torch.Tensor, shape: torch.Size | None) -> torch.Tensor:
    return out if shape is None else out.reshape(shape)


def _topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, index = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, index, torch.relu(values))


def _jump(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.relu(pre) * (pre > threshold)
