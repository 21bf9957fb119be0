"""Transformers as ``HookedModel``s, with TransformerLens hook names.

Two backends share the tokenization and the names:

* ``HFTransformer`` runs the **plain Hugging Face model**. TransformerLens 4.x's architecture adapter
  tells us which HF module is ``blocks.3.attn``, ``blocks.3.mlp.out`` and so on; we put forward
  hooks on those modules, and a registered attention function exposes ``hook_q/k/v``,
  ``hook_attn_scores``, ``hook_pattern`` and ``hook_z``. The bridge's own forward costs ~2.5x the
  HF forward on CPU; this path costs the HF forward plus the hooks you attach.
* ``NativeTransformer`` wraps a ``TransformerBridge.boot_native`` toy model; its hook names are the
  bridge's ``hook_dict``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn

from interp.errors import InputError
from interp.hooks import HookPoint, HookSite, attached, heads_first, heads_last, layer_of
from interp.models.base import HookedModel, TilingPlan
from interp.models.tracing import trace_sites

ATTENTION_IMPLEMENTATION = "interp"
ATTENTION_POINTS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")
_PROBE_LEN = 13  # a prime unlikely to equal any model dimension; marks the "pos" axis in traces


# (residual streams to stack before a branch, the branch's input hooks, substrings naming hooks inside it)
_BRANCHES = (
    (("hook_resid_pre",), ("ln1.hook_in", "attn.hook_in"), (".attn.", "hook_attn_out")),
    (("hook_resid_mid", "hook_resid_pre"), ("ln2.hook_in", "mlp.hook_in"), (".mlp.", "hook_mlp_out")),
)


# inside attention, what else must be stacked with a patched q/k/v/pattern for the copies to meet again
_ATTENTION_SIBLINGS = {
    "hook_q": ("hook_k", "hook_v"),
    "hook_k": ("hook_q", "hook_v"),
    "hook_v": ("hook_pattern",),
    "hook_pattern": ("hook_v",),
}


def _siblings(name: str) -> list[str]:
    """``blocks.L.attn.hook_q`` -> ``[blocks.L.attn.hook_k, blocks.L.attn.hook_v]`` (see ``tiling_plans``)."""
    stem, _, point = name.rpartition(".")
    return [f"{stem}.{other}" for other in _ATTENTION_SIBLINGS.get(point, ())] if ".attn." in name else []


def _residual_identities(
    block: str, values: dict[str, torch.Tensor]
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(alias checked, left side, right side)`` of a pre-LN block's residual identities, where present."""
    pre, attn, mid, mlp, post = (
        values.get(f"{block}.{p}")
        for p in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
    )
    checks = []
    if pre is not None and attn is not None and mid is not None:
        checks.append((f"{block}.hook_attn_out", pre + attn, mid))
    if mid is not None and mlp is not None and post is not None:
        checks.append((f"{block}.hook_mlp_out", mid + mlp, post))
    if mid is None and None not in (pre, attn, mlp, post):
        checks += [
            (f"{block}.hook_attn_out", pre + attn + mlp, post),
            (f"{block}.hook_mlp_out", pre + attn + mlp, post),
        ]
    return checks


@dataclass
class Tokens:
    """Token ids and the attention mask (1 = real token), both ``[batch, pos]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    str_tokens: list[list[str]] | None = None


class TransformerModel(HookedModel):
    """Shared input handling: text or token ids in, ``Tokens`` out, with length checks."""

    kind = "transformer"
    tokenizer: Any = None
    n_ctx: int | None = None
    d_vocab: int | None = None

    def to_tokens(self, text: str | Sequence[str]) -> Tokens:
        """Tokenize text (a string or a batch of strings, right-padded) with the model's tokenizer."""
        if self.tokenizer is None:
            raise InputError(
                f"{self.name} has no tokenizer, so it cannot read text. Pass token ids instead: "
                "a LongTensor of shape (batch, pos)."
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("text input must be a non-empty string or a list of strings")
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        str_tokens = [
            self.tokenizer.convert_ids_to_tokens(row[m.bool()]) for row, m in zip(ids, mask, strict=True)
        ]
        return Tokens(ids, mask, str_tokens)

    def prepare(self, inputs: Any) -> Tokens:
        if isinstance(inputs, Tokens):
            tokens = inputs
        elif isinstance(inputs, str) or (
            isinstance(inputs, list | tuple) and inputs and isinstance(inputs[0], str)
        ):
            tokens = self.to_tokens(inputs)
        elif isinstance(inputs, dict) or hasattr(inputs, "keys"):
            tokens = Tokens(torch.as_tensor(inputs["input_ids"]), _maybe_tensor(inputs.get("attention_mask")))
        else:
            ids = torch.as_tensor(inputs)
            tokens = Tokens(ids.unsqueeze(0) if ids.ndim == 1 else ids)
        return self._check_tokens(tokens)

    def tile_input(self, prepared: Tokens, copies: int) -> Tokens:
        """``copies`` stacked copies of the token ids and mask: row ``k * batch + b`` is prompt ``b``."""
        mask = None if prepared.attention_mask is None else prepared.attention_mask.repeat(copies, 1)
        return Tokens(prepared.input_ids.repeat(copies, 1), mask, None)

    @cached_property
    def _write_through(self) -> dict[str, str]:
        sites, out = self._sites, {}
        for i in range(getattr(self, "n_layers", 0) or 0):
            mid, ln2, post = (f"blocks.{i}.{n}" for n in ("hook_resid_mid", "ln2.hook_in", "hook_resid_post"))
            if mid in sites and ln2 in sites and post in sites and sites[mid].module is sites[ln2].module:
                out[mid] = post
        return out

    def tiling_plans(self, name: str) -> list[TilingPlan]:
        """For a hook in block L: one plan that shares more than stacking at the hook, one that shares less.

        1. Inside the attention (or MLP) branch: stack the copies on the residual stream entering
           the branch, keep one copy at the branch input (``ln1``/``attn`` ``.hook_in``), and stack
           again at ``name``. The branch up to ``name`` runs once and the residual add after it sees
           every copy; on a head sweep this skips every copy's q/k/v projections and attention
           pattern. When ``name`` is q, k, v or the pattern, this needs attention code that
           broadcasts one copy against stacked ones (the suffix route's, on native bridges); the
           next plan also stacks the tensors it meets downstream (q with k and v; v with the pattern). The stream is ``hook_resid_pre`` for attention; for the MLP it is
           ``hook_resid_mid``, or ``hook_resid_pre`` where ``hook_resid_mid`` is only the MLP's input.
        2. After the plain plan (which fails inside a branch unless the batch is one prompt): stack
           at the residual stream entering block L, so blocks < L run once.
        """
        layer = layer_of(name)
        if layer is None:
            return super().tiling_plans(name)
        order = {hook: i for i, hook in enumerate(self.hook_names)}
        plans: list[TilingPlan] = []
        for streams, inputs, markers in _BRANCHES:
            if not any(marker in name for marker in markers):
                continue
            for stream in (f"blocks.{layer}.{hook}" for hook in streams if f"blocks.{layer}.{hook}" in order):
                candidates = [f"blocks.{layer}.{hook}" for hook in inputs]
                branch_in = [h for h in candidates if order[stream] < order.get(h, -1) < order[name]]
                if branch_in:
                    plans.append(((stream, "tile"), (branch_in[0], "untile"), (name, "tile")))
                    siblings = tuple((h, "tile") for h in _siblings(name) if h in order)
                    if siblings:
                        plans.append(((stream, "tile"), (branch_in[0], "untile"), *siblings, (name, "tile")))
        plans += super().tiling_plans(name)  # exact where nothing batch-shaped is reused after name
        entry = f"blocks.{layer}.hook_resid_pre"
        if entry != name and order.get(entry, len(order)) < order[name]:
            plans.append(((entry, "tile"),))
        return plans

    def _check_tokens(self, tokens: Tokens) -> Tokens:
        ids = tokens.input_ids
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise InputError(
                f"token ids must be an integer tensor of shape (batch, pos), got {ids.dtype} {tuple(ids.shape)}"
            )
        if self.n_ctx is not None and ids.shape[1] > self.n_ctx:
            raise InputError(
                f"the input has {ids.shape[1]} tokens but {self.name} takes at most {self.n_ctx} "
                f"(its context length). Shorten the prompt or split it into windows of {self.n_ctx}."
            )
        if self.d_vocab is not None and ids.numel() and (ids.min() < 0 or ids.max() >= self.d_vocab):
            raise InputError(
                f"token ids must lie in [0, {self.d_vocab}) for {self.name}; got [{ids.min().item()}, {ids.max().item()}]"
            )
        return Tokens(ids.to(self.device).long(), tokens.attention_mask, tokens.str_tokens)

    def dim_sizes(self, prepared: Tokens) -> dict[str, int]:
        batch, pos = prepared.input_ids.shape
        return {"batch": batch, "pos": pos}

    def _cache_meta(self, prepared: Tokens) -> dict[str, Any]:
        return {
            "model": self.name,
            "input_ids": prepared.input_ids.cpu(),
            "attention_mask": None if prepared.attention_mask is None else prepared.attention_mask.cpu(),
            "str_tokens": prepared.str_tokens,
        }

    def _probe_tokens(self) -> Tokens:
        length = min(_PROBE_LEN, self.n_ctx or _PROBE_LEN)
        return Tokens(torch.arange(1, length + 1, device=self.device).unsqueeze(0) % (self.d_vocab or 2))


def _maybe_tensor(value: Any) -> torch.Tensor | None:
    return None if value is None else torch.as_tensor(value)


# ------------------------------------------------------------------------------------------------
# Plain Hugging Face models
# ------------------------------------------------------------------------------------------------

_ATTENTION_POINTS: WeakKeyDictionary[nn.Module, nn.ModuleDict] = WeakKeyDictionary()


def _hooked_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF attention with hook points on q, k, v, scores, pattern and z.

    It computes attention eagerly, exactly as HF's eager path does, routing each intermediate
    through its hook point so it can be read or replaced. ``HFTransformer`` selects it only for
    forwards that hook attention internals; every other forward runs HF's own SDPA path.
    """
    points = _ATTENTION_POINTS[module]
    unsupported = [k for k in ("softcap", "sliding_window", "s_aux") if kwargs.get(k) is not None]
    if unsupported:
        raise NotImplementedError(
            f"hooks inside this model's attention are not supported yet (it uses {unsupported}); "
            "hook the attention output (blocks.N.hook_attn_out) instead"
        )
    query = heads_first(points["hook_q"](heads_last(query)))
    key = heads_first(points["hook_k"](heads_last(key)))
    value = heads_first(points["hook_v"](heads_last(value)))
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head across its query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.shape[0] not in (1, scores.shape[0]):  # copies stacked after the mask was built
            mask = mask.repeat(scores.shape[0] // mask.shape[0], *([1] * (mask.ndim - 1)))
        scores = scores + mask
    scores = points["hook_attn_scores"](scores)
    pattern = points["hook_pattern"](nn.functional.softmax(scores, dim=-1).to(value.dtype))
    weights = nn.functional.dropout(pattern, p=dropout, training=module.training)
    z = points["hook_z"](heads_last(torch.matmul(weights, value)))
    return z.contiguous(), pattern


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, _hooked_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


@dataclass(frozen=True)
class _Component:
    """One TransformerLens component name and the HF module it maps to."""

    tl_name: str
    module: nn.Module


class HFTransformer(TransformerModel):
    """A plain HF model with TransformerLens-named hook points (see module docstring)."""

    def __init__(self, hf_model: nn.Module, tokenizer: Any, adapter: Any, name: str, source: str) -> None:
        super().__init__(hf_model, name)
        self.source = source
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.cfg = adapter.cfg
        self.n_layers: int = self.cfg.n_layers
        self.n_ctx = getattr(self.cfg, "n_ctx", None)
        self.d_vocab = getattr(self.cfg, "d_vocab", None)
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._components = self._map_components()
        self._attention_points = self._install_attention_points()

    # --- name map -------------------------------------------------------------------------------

    def _module_at(self, path: str | None) -> nn.Module | None:
        if not path:
            return None
        prefix = getattr(self.module, "base_model_prefix", "")
        for candidate in (path, path.removeprefix(f"{prefix}.")):
            try:
                return self.module.get_submodule(candidate)
            except AttributeError:
                continue
        return None

    def _map_components(self) -> list[_Component]:
        """Walk the adapter's component mapping; keep every component present in this HF model."""
        found: list[_Component] = []
        for key, comp in self.adapter.component_mapping.items():
            if key == "blocks":
                for i in range(self.n_layers):
                    found += self._walk(f"blocks.{i}", f"{comp.name}.{i}", comp)
            else:
                found += self._walk(key, comp.name, comp)
        return found

    def _walk(self, tl_name: str, path: str | None, comp: Any) -> list[_Component]:
        """``path`` is the component's HF module path, or None for a grouping with no module of its
        own (BERT's MLP), whose submodules are then named relative to the enclosing module."""
        module = self._module_at(path)
        out = [_Component(tl_name, module)] if module is not None else []
        for sub_key, sub in (getattr(comp, "submodules", None) or {}).items():
            if sub.name is None:
                sub_path, sub_comp = None, sub
                out += self._walk_group(f"{tl_name}.{sub_key}", path, sub_comp)
            else:
                sub_path = f"{path}.{sub.name}" if path else sub.name
                out += self._walk(f"{tl_name}.{sub_key}", sub_path, sub)
        return out

    def _walk_group(self, tl_name: str, parent_path: str | None, comp: Any) -> list[_Component]:
        out = []
        for sub_key, sub in (getattr(comp, "submodules", None) or {}).items():
            sub_path = f"{parent_path}.{sub.name}" if parent_path and sub.name else sub.name
            out += self._walk(f"{tl_name}.{sub_key}", sub_path, sub)
        return out

    def _install_attention_points(self) -> dict[int, nn.ModuleDict]:
        _register_attention()
        points: dict[int, nn.ModuleDict] = {}
        for comp in self._components:
            parts = comp.tl_name.split(".")
            if len(parts) == 3 and parts[2] == "attn":
                layer = int(parts[1])
                points[layer] = nn.ModuleDict({p: HookPoint() for p in ATTENTION_POINTS})
                for sub in comp.module.modules():
                    _ATTENTION_POINTS[sub] = points[layer]
        try:
            self.module.set_attn_implementation("sdpa")
            self._fast_attention = "sdpa"
        except (ValueError, ImportError):
            self._fast_attention = "eager"
        return points

    def _build_sites(self) -> dict[str, HookSite]:
        sites: dict[str, HookSite] = {}
        for comp in self._components:
            for side, suffix in (("input", "hook_in"), ("output", "hook_out")):
                name = f"{comp.tl_name}.{suffix}"
                sites[name] = HookSite(name, comp.module, side)
        for layer, points in self._attention_points.items():
            for point_name, point in points.items():
                name = f"blocks.{layer}.attn.{point_name}"
                sites[name] = HookSite(name, point, "output")
        sites = trace_sites(
            sites, lambda: self._forward(self._probe_tokens()), {1: "batch", _PROBE_LEN: "pos"}
        )
        aliases = self._aliases(list(sites))
        ordered: dict[str, HookSite] = {}
        for name, site in sites.items():  # each alias sits right after the site it names
            ordered[name] = site
            for alias in aliases.get(name, []):
                ordered[alias] = HookSite(alias, site.module, site.side, site.shape)
        self._withheld = self._non_additive(ordered)
        return {name: site for name, site in ordered.items() if name not in self._withheld}

    def _non_additive(self, sites: dict[str, HookSite]) -> dict[str, str]:
        """``hook_attn_out`` / ``hook_mlp_out`` aliases that are not what the block adds to its residual
        stream, with why. Some architectures scale or normalize a sublayer's output before the add
        (Granite's residual multiplier, OLMo 2's post-sublayer norm); there the module output is not
        the additive contribution that patching, DLA and edge attribution assume. Checked on one
        forward in pre-LN blocks: resid_pre + attn_out = resid_mid, resid_mid + mlp_out = resid_post
        (resid_pre + attn_out + mlp_out = resid_post without a resid_mid)."""
        parts = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
        names = [f"blocks.{i}.{p}" for i in range(self.n_layers) for p in parts if f"blocks.{i}.{p}" in sites]
        values: dict[str, torch.Tensor] = {}
        readers = [(sites[n], lambda act, n=n: values.setdefault(n, act.detach().clone())) for n in names]
        with attached(readers), torch.no_grad():
            self._forward(self._probe_tokens())
        order = {name: i for i, name in enumerate(sites)}
        withheld: dict[str, str] = {}
        for i in range(self.n_layers):
            b = f"blocks.{i}"
            if order.get(f"{b}.attn.o.hook_out", -1) < order.get(f"{b}.ln1.hook_in", -1):
                continue  # post-LN (BERT): the stream is normalized after each add by design
            for name, lhs, rhs in _residual_identities(b, values):
                if not torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-5 * float(rhs.abs().max().clamp_min(1.0))):
                    module = name.replace("hook_attn_out", "attn.hook_out").replace(
                        "hook_mlp_out", "mlp.hook_out"
                    )
                    withheld[name] = (
                        f"{name} is not offered on {self.name}: the {name.split('_')[-2]} output it would name is "
                        "not what the block adds to its residual stream (the residual identities fail on a test "
                        f"input; the architecture scales or normalizes it first). The module's own output is {module}."
                    )
        return withheld

    def _aliases(self, order: list[str]) -> dict[str, list[str]]:
        """TransformerLens's canonical names, keyed by the site name each one points at."""
        index = {name: i for i, name in enumerate(order)}
        aliases: dict[str, list[str]] = {}

        def alias(new: str, *targets: str) -> None:
            target = next((t for t in targets if t in index), None)
            if target is not None:
                aliases.setdefault(target, []).append(new)

        alias("hook_embed", "embed.hook_out")
        alias("hook_pos_embed", "pos_embed.hook_out")
        for i in range(self.n_layers):
            b = f"blocks.{i}"
            alias(f"{b}.hook_resid_pre", f"{b}.hook_in")
            alias(f"{b}.hook_resid_post", f"{b}.hook_out")
            alias(f"{b}.hook_attn_out", f"{b}.attn.o.hook_out", f"{b}.attn.hook_out")
            alias(f"{b}.hook_mlp_out", f"{b}.mlp.out.hook_out", f"{b}.mlp.hook_out")
            alias(f"{b}.mlp.hook_pre", f"{b}.mlp.gate.hook_out", f"{b}.mlp.in.hook_out")
            alias(f"{b}.mlp.hook_post", f"{b}.mlp.out.hook_in")
            post_ln = index.get(f"{b}.attn.o.hook_out", -1) < index.get(f"{b}.ln1.hook_in", -1)
            if post_ln:  # BERT-style: the residual after attention is ln1's output
                alias(f"{b}.hook_resid_mid", f"{b}.ln1.hook_out")
            else:
                alias(f"{b}.hook_resid_mid", f"{b}.ln2.hook_in")
        return aliases

    # --- running --------------------------------------------------------------------------------

    def _select_attention(self, prepared: Tokens) -> None:
        """Eager attention with hook points when any is hooked, or when copies of a padded batch
        are stacked mid-forward (it stacks the attention mask to match); else the fast default."""
        hooked = any(p._forward_hooks for points in self._attention_points.values() for p in points.values())
        stacked_mask = self._stacking and prepared.attention_mask is not None and len(prepared.input_ids) > 1
        wanted = ATTENTION_IMPLEMENTATION if hooked or stacked_mask else self._fast_attention
        if self.module.config._attn_implementation != wanted:
            self.module.set_attn_implementation(wanted)

    def _forward(self, prepared: Tokens) -> torch.Tensor:
        self._select_attention(prepared)
        out = self.module(
            input_ids=prepared.input_ids, attention_mask=prepared.attention_mask, use_cache=False
        )
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

    def to_bridge(self):
        """A TransformerLens ``TransformerBridge`` of the same weights (a separate copy), for TL's tools."""
        from transformer_lens.model_bridge import TransformerBridge

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return TransformerBridge.boot_transformers(self.source, device=str(self.device)).eval()


# ------------------------------------------------------------------------------------------------
# Native (boot_native) toy transformers
# ------------------------------------------------------------------------------------------------


class NativeTransformer(TransformerModel):
    """A ``TransformerBridge.boot_native`` model; hook names are its ``hook_dict``."""

    def __init__(self, bridge: nn.Module, name: str, tokenizer: Any = None) -> None:
        super().__init__(bridge, name)
        self.bridge = bridge
        self.cfg = bridge.cfg
        self.tokenizer = tokenizer
        self.n_layers = self.cfg.n_layers
        self.n_ctx = self.cfg.n_ctx
        self.d_vocab = self.cfg.d_vocab

    def _build_sites(self) -> dict[str, HookSite]:
        sites = {name: HookSite(name, point, "output") for name, point in self.bridge.hook_dict.items()}
        return trace_sites(
            sites, lambda: self._forward(self._probe_tokens()), {1: "batch", _PROBE_LEN: "pos"}
        )

    def _forward(self, prepared: Tokens) -> torch.Tensor:
        return self.bridge(prepared.input_ids, attention_mask=prepared.attention_mask)
