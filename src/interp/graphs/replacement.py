"""The local replacement model of one prompt: transcoders for MLPs, frozen attention and norms.

For a prompt, the real model's forward is recorded once (calling the model's own modules, no hook
points, so user hooks never run). Then the *frozen* model is the affine map from node
contributions to node values in which

- every norm divides by its scale on the prompt (``sqrt(var + eps)`` for LayerNorm, the RMS for
  RMSNorm), held constant: the centring and the weight/bias stay linear/affine;
- every attention head mixes positions with its pattern on the prompt, held constant; the value
  and output projections stay affine;
- every MLP is replaced by its transcoder: active features write ``a · W_dec[f]``, the error node
  writes what the transcoder misses (``mlp_out - recons``) and ``b_dec`` is a constant; a skip
  transcoder's ``W_skip`` path is linear in its input and stays in the map;
- the embedding writes ``W_E[token] + W_pos[pos]`` (one token node per position).

Gradients of this map are the direct effects. ``replay`` runs it forward at the prompt's own node
values and must give back the real model's activations and logits (checked by the tests to float64
precision): that is what makes its gradients the real model's local, linearized direct effects.

Supported models: ``TransformerBridge.boot_native`` decoders (``interp.load`` of a zoo model or a
``TransformerBridgeConfig``) with LayerNorm, LayerNormPre or RMSNorm, learned or rotary positions,
a (non-gated) MLP per layer and no logit soft-cap. Grouped-query attention is supported. (TL's
native RMSNorm computes in float32 even in a float64 model, so there the replay matches the real
values to float32 rounding only.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum, rearrange
from torch import nn

from interp.errors import InputError

# Where a transcoder may read, by what it sees: the stream before ln2, ln2's output, or ln2's
# normalized input before its weight and bias (TL's ``hook_normalized``).
IN_SITES = {
    "pre": ("ln2.hook_in", "hook_resid_mid"),
    "post": ("mlp.hook_in", "mlp.in.hook_in", "ln2.hook_out"),
    "normalized": ("ln2.hook_normalized",),
}
OUT_SITES = ("mlp.hook_out", "hook_mlp_out", "mlp.out.hook_out")


@dataclass
class Norm:
    """A norm frozen at its scales on the prompt: ``((x - mean?) / scale) * weight + bias``."""

    center: bool
    scale: torch.Tensor  # [pos, 1]
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor, *, affine_bias: bool = True) -> torch.Tensor:
        if self.center:
            x = x - x.mean(dim=-1, keepdim=True)
        x = x / self.scale
        if self.weight is not None:
            x = x * self.weight
        if affine_bias and self.bias is not None:
            x = x + self.bias
        return x


def _norm_kind(module: nn.Module) -> tuple[bool, float]:
    """(centres?, eps) for the norm modules native models use."""
    name = type(module).__name__
    eps = float(getattr(module, "eps", 1e-5))
    if isinstance(module, nn.LayerNorm) or name == "NativeLayerNormPre":
        return True, eps
    if name in ("NativeRMSNorm", "NativeRMSNormPre") or isinstance(module, getattr(nn, "RMSNorm", ())):
        return False, eps
    raise InputError(
        f"attribution graphs freeze LayerNorm/RMSNorm scales; this model's norm is {name}. Use a model "
        "with LN, LNPre or RMS normalization."
    )


def freeze_norm(module: nn.Module, x: torch.Tensor) -> Norm:
    """The norm ``module`` frozen at its scale on ``x`` ``[pos, d]``."""
    center, eps = _norm_kind(module)
    centred = x - x.mean(dim=-1, keepdim=True) if center else x
    scale = (centred.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return Norm(
        center,
        scale.detach(),
        None if weight is None else weight.detach(),
        None if bias is None else bias.detach(),
    )


def native_core(model: Any, *, allow_attn_only: bool = False) -> nn.Module:
    """The ``NativeModel`` under an interp ``NativeTransformer``, or an InputError saying what fits."""
    bridge = getattr(model, "bridge", None)
    core = getattr(bridge, "original_model", None)
    if core is None or type(core).__name__ != "NativeModel":
        kind = getattr(model, "kind", type(model).__name__)
        module = getattr(model, "module", None)
        config = getattr(module, "config", None)
        if (
            config is not None
            and not getattr(config, "is_decoder", False)
            and getattr(config, "model_type", "")
            in ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet", "xlm-roberta")
        ):
            raise InputError(
                f"{getattr(model, 'name', 'this model')} is an encoder-only model ({config.model_type}): attribution "
                "graphs explain next-token predictions of a decoder. Use a causal language model, e.g. a zoo LM."
            )
        raise InputError(
            f"attribute() works on TransformerBridge.boot_native decoders (interp.load('zoo:...') or a "
            f"TransformerBridgeConfig); got a {kind} model ({getattr(model, 'name', type(model).__name__)})."
        )
    cfg = core.cfg
    if not getattr(unwrap(unwrap(core.layers[0]).attn), "causal", True):
        raise InputError(
            "this model's attention is not causal (encoder-only): attribution graphs need a decoder"
        )
    if getattr(cfg, "attn_only", False) and not allow_attn_only:
        raise InputError(
            "this model is attention-only: there are no MLPs to replace by transcoders. Use a model with MLPs."
        )
    if getattr(cfg, "gated_mlp", False):
        raise InputError("gated MLPs are not supported by attribute(); use a model with a two-layer MLP")
    if float(getattr(core, "output_logits_soft_cap", 0.0) or 0.0) > 0:
        raise InputError(
            "logit soft-capping is not linear; attribute() needs a model without output_logits_soft_cap"
        )
    return core


def _layer_of(name: str, suffixes: Sequence[str]) -> int | None:
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    return int(parts[1]) if ".".join(parts[2:]) in suffixes else None


def check_transcoders(core: nn.Module, transcoders: Sequence[Any]) -> list[str]:
    """Validate one transcoder per layer, in layer order; returns where each reads (a key of
    ``IN_SITES``: ``"pre"`` ln2's input, ``"post"`` its output, ``"normalized"`` before its affine)."""
    from interp.sae.modules import SAE

    n_layers, d_model = core.cfg.n_layers, core.cfg.d_model
    if len(transcoders) != n_layers:
        raise InputError(
            f"attribute() needs one transcoder per layer: the model has {n_layers} layers, got "
            f"{len(transcoders)} transcoders. Pass [tc_layer0, ..., tc_layer{n_layers - 1}]."
        )
    reads: list[str] = []
    for layer, tc in enumerate(transcoders):
        if not isinstance(tc, SAE) or not tc.cfg.is_transcoder:
            arch = getattr(getattr(tc, "cfg", None), "architecture", type(tc).__name__)
            raise InputError(
                f"transcoders[{layer}] is a {arch!r}, not a transcoder: use interp.sae SAEs with architecture "
                "'transcoder' or 'skip_transcoder' (reading the MLP input, writing the MLP output)."
            )
        c = tc.cfg
        read = next((k for k, names in IN_SITES.items() if _layer_of(c.hook_name, names) is not None), None)
        out = _layer_of(c.hook_name_out or "", OUT_SITES)
        if read is None or _layer_of(c.hook_name, IN_SITES[read]) != layer or out != layer:
            raise InputError(
                f"transcoders[{layer}] reads {c.hook_name!r} and writes {c.hook_name_out!r}; the layer-{layer} "
                f"transcoder must read blocks.{layer}.mlp.hook_in (or ln2.hook_in / ln2.hook_normalized) and write "
                f"blocks.{layer}.mlp.hook_out. Pass the transcoders in layer order, one per layer."
            )
        if c.d_in != d_model or c.width_out != d_model:
            raise InputError(
                f"transcoders[{layer}] maps width {c.d_in} -> {c.width_out}, but the model's d_model is {d_model}: "
                "use transcoders trained on this model."
            )
        if (
            c.normalize_activations not in ("none", "expected_average_only_in")
            or c.rescale_acts_by_decoder_norm
        ):
            raise InputError(
                f"transcoders[{layer}] normalizes its input ({c.normalize_activations}) or rescales by decoder "
                "norm; attribution needs an affine encoder. Fold the normalization into the weights first."
            )
        if c.architecture not in ("transcoder", "skip_transcoder") or c.reshape_activations != "none":
            raise InputError(f"transcoders[{layer}] has an unsupported layout ({c.reshape_activations})")
        reads.append(read)
    return reads


@dataclass
class Layer:
    """Everything frozen about one block on the prompt."""

    ln1: Norm
    ln2: Norm
    pattern: torch.Tensor  # [head, query, key]
    W_V: torch.Tensor  # [head, d_model, d_head]
    b_V: torch.Tensor  # [head, d_head]
    W_O: torch.Tensor  # [head, d_head, d_model]
    b_O: torch.Tensor  # [d_model]
    W_Q: torch.Tensor
    b_Q: torch.Tensor
    W_K: torch.Tensor
    b_K: torch.Tensor
    attn_scale: float
    transcoder: Any
    reads: str  # "pre", "post" or "normalized" (see IN_SITES)
    resid_pre: torch.Tensor  # [pos, d_model] (clean)
    resid_mid: torch.Tensor
    mlp_in: torch.Tensor  # what the transcoder reads (clean)
    mlp_out: torch.Tensor
    pre_acts: torch.Tensor  # [pos, d_sae]
    acts: torch.Tensor  # [pos, d_sae]
    error: torch.Tensor  # [pos, d_model]

    def attention(self, x: torch.Tensor, *, with_bias: bool = True) -> torch.Tensor:
        """Frozen attention ``[batch, pos, d]`` -> ``[batch, pos, d]`` (patterns held fixed)."""
        h = self.ln1(x, affine_bias=with_bias)
        v = einsum(h, self.W_V, "b p d, h d e -> b h p e")
        if with_bias:
            v = v + self.b_V[None, :, None, :]
        z = einsum(self.pattern, v, "h q k, b h k e -> b h q e")
        out = einsum(z, self.W_O, "b h q e, h e d -> b q d")
        return out + self.b_O if with_bias else out

    def tc_input(self, resid_mid: torch.Tensor, *, with_bias: bool = True) -> torch.Tensor:
        """What the transcoder reads, from the stream before ``ln2`` (frozen)."""
        if self.reads == "pre":
            return resid_mid
        if self.reads == "normalized":
            return Norm(self.ln2.center, self.ln2.scale, None, None)(resid_mid)
        return self.ln2(resid_mid, affine_bias=with_bias)

    def skip(self, tc_in: torch.Tensor) -> torch.Tensor | float:
        tc = self.transcoder
        return tc_in @ tc.W_skip.T.to(tc_in.dtype) if tc.cfg.architecture == "skip_transcoder" else 0.0


def _split_heads(linear: nn.Linear, n_heads: int, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = rearrange(linear.weight.detach(), "(h e) d -> h d e", h=n_kv)
    b = rearrange(linear.bias.detach(), "(h e) -> h e", h=n_kv)
    if n_heads != n_kv:
        w, b = w.repeat_interleave(n_heads // n_kv, 0), b.repeat_interleave(n_heads // n_kv, 0)
    return w, b


@dataclass
class Replacement:
    """The recorded forward of one prompt and the frozen affine model built on it."""

    tokens: torch.Tensor  # [pos]
    embed: torch.Tensor  # [pos, d_model]: token + position embedding (the token nodes)
    layers: list[Layer]
    ln_final: Norm
    W_U: torch.Tensor  # [d_model, d_vocab]
    b_U: torch.Tensor  # [d_vocab]
    logits: torch.Tensor  # [pos, d_vocab] (the real model's)
    rotary: bool

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    # --- the frozen forward -------------------------------------------------------------------

    def run(
        self, embed: torch.Tensor, writes: Sequence[torch.Tensor], *, with_bias: bool = True
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The frozen model forward on a batch: ``embed`` ``[b, pos, d]`` and one MLP-output write
        per layer (what replaces the MLP, less its skip term). Returns each layer's transcoder
        input ``[b, pos, d]`` and the final normed stream ``[b, pos, d]``. With ``with_bias=False``
        every constant (norm biases, b_V, b_O) is dropped: the linear part, for gradients."""
        x = embed
        tc_inputs = []
        for layer, write in zip(self.layers, writes, strict=True):
            mid = x + layer.attention(x, with_bias=with_bias)
            tc_in = layer.tc_input(mid, with_bias=with_bias)
            tc_inputs.append(tc_in)
            x = mid + write + layer.skip(tc_in)
        return tc_inputs, self.ln_final(x, affine_bias=with_bias)

    def clean_writes(self) -> list[torch.Tensor]:
        """Per layer, what replaces the MLP on the prompt: ``acts @ W_dec + b_dec + error``."""
        return [
            self.feature_write(layer) + layer.transcoder.b_dec.detach().to(self.dtype) + layer.error
            for layer in self.layers
        ]

    def feature_write(self, layer: Layer) -> torch.Tensor:
        return layer.acts @ layer.transcoder.W_dec.detach().to(self.dtype)


def _encode(tc: Any, x: torch.Tensor) -> torch.Tensor:
    """A transcoder's pre-activations ``[pos, d_sae]`` (affine; no hook points run)."""
    return tc.pre_acts(x.to(tc.dtype)).to(x.dtype)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain torch module under TransformerLens bridge wrappers (which carry hook points)."""
    while hasattr(module, "original_component") and module.original_component is not None:
        module = module.original_component
    return module


def _linear(module: nn.Module) -> nn.Linear:
    return unwrap(module)  # type: ignore[return-value]


def _attention(
    attn: nn.Module, h: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NativeAttention's forward from its weights (no hook points): output ``[pos, d]`` and
    pattern ``[head, q, k]`` for one sequence ``h`` ``[pos, d]``."""
    n_pos = h.shape[0]
    q = rearrange(_linear(attn.q)(h), "p (h e) -> 1 h p e", h=attn.n_heads)
    k = rearrange(_linear(attn.k)(h), "p (h e) -> 1 h p e", h=attn.n_kv_heads)
    v = rearrange(_linear(attn.v)(h), "p (h e) -> 1 h p e", h=attn.n_kv_heads)
    if attn.rotary is not None:
        q, k = unwrap(attn.rotary).apply_rope(q, k, position_ids=positions)
    if attn.kv_repeats > 1:
        k, v = k.repeat_interleave(attn.kv_repeats, dim=1), v.repeat_interleave(attn.kv_repeats, dim=1)
    scores = q @ k.transpose(-2, -1) / attn.scale
    if attn.attn_scores_soft_cap > 0:
        scores = attn.attn_scores_soft_cap * torch.tanh(scores / attn.attn_scores_soft_cap)
    mask = torch.triu(torch.ones(n_pos, n_pos, dtype=torch.bool, device=h.device), diagonal=1)
    pattern = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1).masked_fill(mask, 0.0)
    z = rearrange(pattern @ v, "1 h p e -> p (h e)")
    return _linear(attn.o)(z), pattern[0]


def transcoder_input(read: str, ln2: nn.Module, mid: torch.Tensor) -> torch.Tensor:
    """What a transcoder reading at ``read`` sees, from the stream ``mid`` before ln2."""
    if read == "pre":
        return mid
    if read == "normalized":
        frozen = freeze_norm(ln2, mid)
        return Norm(frozen.center, frozen.scale, None, None)(mid)
    return ln2(mid)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if getattr(mlp, "ln", None) is not None or not hasattr(mlp, "fc_in"):
        raise InputError("attribute() supports two-layer MLPs (no SoLU-LN, no gated MLP)")
    return _linear(mlp.fc_out)(mlp.act(_linear(mlp.fc_in)(x)))


@torch.no_grad()
def record(model: Any, transcoders: Sequence[Any], tokens: torch.Tensor) -> Replacement:
    """Run the model's forward once on ``tokens`` ``[pos]`` from its own weights (no hook points
    run, so user hooks never see it) and freeze what the graph needs."""
    core = native_core(model)
    reads = check_transcoders(core, transcoders)
    n_pos = int(tokens.shape[0])
    positions = torch.arange(n_pos, device=tokens.device)
    x = unwrap(core.tok_embed)(tokens)
    if core.pos is not None:
        x = x + unwrap(core.pos)(positions)
    embed = x.clone()
    layers: list[Layer] = []
    for block_wrapped, tc, read in zip(core.layers, transcoders, reads, strict=True):
        block = unwrap(block_wrapped)
        attn, ln1_mod, ln2_mod, mlp = (
            unwrap(block.attn),
            unwrap(block.ln1),
            unwrap(block.ln2),
            unwrap(block.mlp),
        )
        ln1 = freeze_norm(ln1_mod, x)
        attn_out, pattern = _attention(attn, ln1_mod(x), positions[None])
        mid = x + attn_out
        ln2 = freeze_norm(ln2_mod, mid)
        normed = ln2_mod(mid)
        mlp_out = _mlp(mlp, normed)
        tc_in = transcoder_input(read, ln2_mod, mid)
        pre_acts = _encode(tc, tc_in)
        acts = tc.activation(pre_acts.to(tc.dtype)).to(pre_acts.dtype)
        recons = acts @ tc.W_dec.to(acts.dtype) + tc.b_dec.to(acts.dtype)
        if tc.cfg.architecture == "skip_transcoder":
            recons = recons + tc_in @ tc.W_skip.T.to(acts.dtype)
        n_heads, n_kv = attn.n_heads, attn.n_kv_heads
        W_V, b_V = _split_heads(_linear(attn.v), n_heads, n_kv)
        W_Q, b_Q = _split_heads(_linear(attn.q), n_heads, n_heads)
        W_K, b_K = _split_heads(_linear(attn.k), n_heads, n_kv)
        o = _linear(attn.o)
        W_O = rearrange(o.weight.detach(), "d (h e) -> h e d", h=n_heads)
        layers.append(
            Layer(
                ln1=ln1,
                ln2=ln2,
                pattern=pattern.detach(),
                W_V=W_V,
                b_V=b_V,
                W_O=W_O,
                b_O=o.bias.detach(),
                W_Q=W_Q,
                b_Q=b_Q,
                W_K=W_K,
                b_K=b_K,
                attn_scale=float(attn.scale),
                transcoder=tc,
                reads=read,
                resid_pre=x.clone(),
                resid_mid=mid.clone(),
                mlp_in=tc_in.clone(),
                mlp_out=mlp_out.clone(),
                pre_acts=pre_acts,
                acts=acts,
                error=(mlp_out - recons).detach(),
            )
        )
        x = mid + mlp_out
    ln_out, head = unwrap(core.ln_out), _linear(core.head)
    ln_final = freeze_norm(ln_out, x)
    logits = head(ln_out(x))
    W_U = head.weight.detach().T
    b_U = head.bias.detach() if head.bias is not None else torch.zeros(W_U.shape[1], dtype=W_U.dtype)
    return Replacement(
        tokens=tokens,
        embed=embed,
        layers=layers,
        ln_final=ln_final,
        W_U=W_U,
        b_U=b_U,
        logits=logits.detach(),
        rotary=core.rotary is not None,
    )
