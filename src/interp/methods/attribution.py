"""Input, layer and neuron attribution: which pixels, tokens or activations drive one output, by
every method captum has, with one call shape and one result type.

    >>> a = attribute(model, images, target=3, method="ig")          # pixels of an image model
    >>> a.values.shape, a.delta                                        # [B, 1, 8, 8], IG's error
    >>> a = attribute(lm, "The cat sat on the", method="saliency")    # tokens of a transformer
    >>> a.values.shape                                                 # [B, pos]
    >>> attribute(model, images, 3, "ig", noise_tunnel="smoothgrad")   # SmoothGrad over IG
    >>> attribute(model, images, 3, "gradcam", layer="conv2.hook_out") # a layer, by hook name
    >>> attribute(model, images, method="ig", layer="conv2.hook_out", neuron=(5, 3, 3))

Input methods (all attribute one scalar per example: ``target`` picks it from the output):

* ``"saliency"``: |d out / d x| (Simonyan et al. 2014), through captum's ``Saliency``.
* ``"grad_x_input"``: x * d out / d x, through captum's ``InputXGradient``.
* ``"occlusion"``: out(x) - out(x with a window set to the baseline), captum's ``Occlusion``.
* ``"ig"``: integrated gradients (Sundararajan et al. 2017) with captum's Gauss-Legendre rule,
  computed here *streamed*: a few interpolation steps per forward, gradients summed as they come,
  so memory holds ``internal_batch_size`` steps instead of all ``n_steps`` x batch (captum's
  default, the cause of its OOM reports). ``delta`` = sum(attributions) - (out(x) - out(baseline)),
  the completeness error, per example.
* through captum unchanged (``captum_bridge``): ``"deeplift"``, ``"deeplift_shap"``,
  ``"guided_backprop"``, ``"deconvolution"`` (image models: they replace module backwards),
  ``"gradient_shap"``, ``"lime"``, ``"kernel_shap"``, ``"feature_ablation"``; stochastic ones are
  seeded (``seed=``).
* ``noise_tunnel=`` ``"smoothgrad"``, ``"smoothgrad_sq"`` or ``"vargrad"`` over any of them
  (captum's NoiseTunnel; over IG streamed here with captum's noise draws: equal results in a
  fraction of the memory, benchmarks/bench_ig.py).

Layer methods (``layer=`` any hook name, mapped to the module captum hooks): ``"ig"``
(LayerIntegratedGradients, several layers at once), ``"conductance"``, ``"gradcam"``; neuron
methods (``layer=`` and ``neuron=``): ``"ig"`` (NeuronIntegratedGradients), ``"gradient"``.
``model_randomization`` runs the Adebayo et al. sanity check for any of them.

Image models are attributed per pixel. Transformers are attributed per token through the
embedding: the word embeddings (hook ``hook_embed``) are replaced by the tensor being attributed,
so IG interpolates embeddings, occlusion replaces one token's embedding by the baseline's, and each
token's score is the sum (saliency: L2 norm) over the embedding dimension. Layer IG and Grad-CAM on
a transformer run from the token ids (the baseline is a token id, default 0), as captum's
LayerIntegratedGradients on an embedding layer.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from einops import rearrange, reduce, repeat

from interp.errors import InputError
from interp.methods import captum_bridge as bridge
from interp.models.module import ModuleModel

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from interp.models.base import HookedModel

METHODS = (
    "saliency",
    "ig",
    "grad_x_input",
    "occlusion",
    "deeplift",
    "deeplift_shap",
    "gradient_shap",
    "guided_backprop",
    "deconvolution",
    "lime",
    "kernel_shap",
    "feature_ablation",
)
LAYER_METHODS = bridge.LAYER_METHODS
NEURON_METHODS = bridge.NEURON_METHODS
INTEGRATING = ("ig", "conductance")  # the methods that take n_steps (integration points)
NOISE_TUNNELS = bridge.NOISE_TUNNELS
PER_TOKEN_METHODS = ("occlusion", "lime", "kernel_shap", "feature_ablation")  # one value per token
EMBED_HOOK = "hook_embed"
Target = int | Sequence[int] | torch.Tensor | None


@dataclass
class Attribution:
    """Attributions of one scalar output per example, captum style.

    Attributes:
        values: image models ``[B, *input_shape]`` (per pixel); transformers ``[B, pos]`` (per
            token; padding positions are 0).
        method: one of ``METHODS``.
        target: ``[B]`` output index attributed for each example.
        delta: ``[B]`` IG completeness error ``sum(values) - (f(x) - f(baseline))``; None otherwise.
        inputs: the images, or the token ids ``[B, pos]``.
        baseline: the baseline (images, or embeddings ``[B, pos, d_model]``), None for saliency.
        output: ``[B]`` the attributed scalar ``f(x)``.
        str_tokens: token strings per example (transformers), real tokens only.
        per_dim: transformers: attributions per embedding dimension ``[B, pos, d_model]`` (layer
            methods: per dimension of the first layer's activation).
        config: method settings (n_steps, window, library, ...), recorded for reports.
        by_layer: layer methods: the attribution of each layer's activation, by hook name
            (``values`` is the first: as is for image models, summed per token for transformers).
    """

    values: torch.Tensor
    method: str
    target: torch.Tensor
    delta: torch.Tensor | None
    inputs: torch.Tensor
    baseline: torch.Tensor | None
    output: torch.Tensor
    str_tokens: list[list[str]] | None = None
    per_dim: torch.Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)
    by_layer: dict[str, torch.Tensor] | None = None
    mask: torch.Tensor | None = None

    def token_values(self, index: int = 0) -> torch.Tensor:
        """Transformers: example ``index``'s values at its real tokens, aligned with
        ``str_tokens[index]`` (padding dropped, whichever side it is on)."""
        row = self.values[index]
        return row if self.mask is None else row[self.mask[index].bool()]

    def figure(self, index: int = 0) -> go.Figure:
        """Image models: the input beside its attribution map; transformers: a bar per token."""
        from interp.methods.featureviz import image_grid_figure

        title = f"{self.method} attribution, target {int(self.target[index])}"
        if self.str_tokens is None:
            image = self.inputs[index]
            panels = [image.mean(0), self.values[index].sum(0)]
            return image_grid_figure(panels, ["input", title], diverging=[False, True])
        import plotly.graph_objects as go

        tokens = self.str_tokens[index]
        values = self.token_values(index).tolist()
        labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
        fig = go.Figure(
            go.Bar(x=labels, y=values, marker_color=["#d62728" if v < 0 else "#1f77b4" for v in values])
        )
        fig.update_layout(title=title, xaxis_title="token", yaxis_title="attribution", height=360)
        return fig

    def html(self, index: int = 0) -> str:
        """Transformers: circuitsvis colored tokens (self-contained HTML, script inlined)."""
        if self.str_tokens is None:
            raise InputError("html() shows token attributions; this is an image model, use figure()")
        from circuitsvis.tokens import colored_tokens

        tokens = self.str_tokens[index]
        values = self.token_values(index).float()
        bound = float(values.abs().max().clamp_min(1e-12))
        return colored_tokens(tokens, values.tolist(), min_value=-bound, max_value=bound).local_src


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def attribute(
    model: HookedModel,
    inputs: Any,
    target: Target = None,
    method: str = "ig",
    baseline: Any = None,
    *,
    baselines: Any = None,
    layer: str | Sequence[str] | None = None,
    neuron: int | Sequence[int] | None = None,
    noise_tunnel: str | None = None,
    nt_samples: int = 5,
    stdevs: float = 1.0,
    n_samples: int | None = None,
    feature_mask: torch.Tensor | None = None,
    seed: int = 0,
    n_steps: int = 50,
    internal_batch_size: int | None = None,
    window: Sequence[int] | None = None,
    position: int | None = None,
) -> Attribution:
    """Attribute ``model``'s output for ``target`` to the input pixels or tokens, to a layer, or
    a layer's neuron to the input: one call shape for every method (captum's, on the same module).

    Args:
        model: an image model (``ModuleModel``) or a transformer (needs ``hook_embed``).
        inputs: an image batch ``[B, *input_shape]`` (or one image), or text / token ids.
        target: the output index per example (an int for all, or one per example). Image models:
            a class logit. Transformers: an index into the last output axis (a vocabulary logit, or a
            hidden unit for encoders) at ``position``. None: each example's argmax. Not with
            ``neuron=`` (the neuron is the explained scalar).
        method: input methods ``METHODS``; with ``layer=``: ``LAYER_METHODS`` (``"ig"``:
            LayerIntegratedGradients, ``"conductance"``, ``"gradcam"``); with ``layer=`` and
            ``neuron=``: ``NEURON_METHODS`` (``"ig"``, ``"gradient"``).
        baseline / baselines: the reference input (one name for the other; give one). Images: a
            number or a tensor broadcastable to the input (default 0); ``deeplift_shap`` and
            ``gradient_shap`` take a distribution ``[N, *input_shape]`` (gradient_shap default: one
            zero image). Transformers: None (zero embeddings), a token id (its embedding at every
            position), or an embedding tensor; layer and neuron methods on transformers: a token id
            (default 0), whose layer activation is the reference.
        layer: a hook name (``"conv2.hook_out"``, ``"blocks.0.hook_resid_pre"``), or several for
            layer IG (e.g. a BERT's ``["embed.hook_out", "pos_embed.hook_out",
            "token_type_embed.hook_out"]``); the values are attributions of that activation.
        neuron: with ``layer=``, the unit of one example's activation there (an int, or a tuple
            such as ``(channel, y, x)``); the values are input attributions of that unit.
        noise_tunnel: ``"smoothgrad"``, ``"smoothgrad_sq"`` or ``"vargrad"`` over the input method
            (captum's NoiseTunnel; over ``"ig"`` streamed here), ``nt_samples`` noisy copies with
            Gaussian noise of std ``stdevs`` (captum's defaults 5 and 1.0).
        n_samples: lime / kernel_shap (captum's default 25), gradient_shap (5).
        feature_mask: lime, kernel_shap, feature_ablation: feature ids broadcastable to one
            input (images default: every pixel its own; transformers: every token).
        seed: seeds the random draws of the stochastic methods and the noise tunnel (captum draws
            from torch's global generator; the call runs in a forked RNG state seeded with it).
        n_steps: IG-family number of Gauss-Legendre points.
        internal_batch_size: IG: examples x steps per forward (default: 8 steps at a time).
        window: occlusion window over one example (images default ``(C, 2, 2)``, stride 1;
            transformers always one token).
        position: transformers: the output position attributed (default: each example's last
            real token).
    """
    base_arg = _one_baseline(baseline, baselines)
    _check_method(method, layer, neuron, noise_tunnel, target)
    if not isinstance(n_steps, int) or n_steps < 1:
        raise InputError(f"n_steps must be a positive integer, got {n_steps!r}")
    if n_samples is not None and (not isinstance(n_samples, int) or n_samples < 1):
        raise InputError(f"n_samples must be a positive integer, got {n_samples!r}")
    shap = method in bridge.SHAP_METHODS and layer is None
    space = (
        _image_space(model, inputs, None if shap else base_arg)
        if model.kind != "transformer"
        else _token_space(model, inputs, _token_baseline(base_arg, shap, layer, method, neuron), position)
    )
    if method in bridge.MODULE_METHODS and (model.kind == "transformer" or not space.module_ok):
        raise InputError(
            f"method {method!r} replaces the backward of the model's modules, so it needs an image "
            f"model (a plain nn.Module); {model.name} is a {model.kind}: use 'ig', 'gradient_shap' "
            "or 'saliency' for it"
        )
    with torch.no_grad():
        out = space.forward(space.x, *space.extra)
    # a neuron attribution explains its unit, whatever the output's shape (the target is not used)
    targets = _targets(target, out.flatten(1) if neuron is not None else out, space.x.shape[0])
    config: dict[str, Any] = {"method": method, "library": "captum"}
    with _seeded(seed):
        if layer is not None:
            return _layer_or_neuron(model, space, method, base_arg, targets, layer, neuron, n_steps,
                                    internal_batch_size, config)  # fmt: skip
        values, delta, extra_config = _input_method(
            method, model, space, targets, base_arg, noise_tunnel, nt_samples, stdevs, n_samples,
            feature_mask, n_steps, internal_batch_size, window,
        )  # fmt: skip
    config.update(extra_config)
    if noise_tunnel is not None:
        config.update(noise_tunnel=noise_tunnel, nt_samples=nt_samples, stdevs=stdevs, seed=seed)
    elif method in bridge.STOCHASTIC:
        config["seed"] = seed
    scalar = _select(out, targets)
    return space.finish(values.detach(), method, targets, delta, scalar, config)


@contextlib.contextmanager
def _seeded(seed: int):
    """torch's and numpy's global generators seeded with ``seed`` (captum draws from both: e.g.
    GradientShap's alphas from numpy), and both restored afterwards."""
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed)
            yield
    finally:
        np.random.set_state(state)


def _token_baseline(base_arg: Any, shap: bool, layer: Any, method: str, neuron: Any) -> Any:
    """The baseline the token space embeds: None where the method reads it elsewhere (SHAP
    distributions; layer IG and Grad-CAM, whose baseline is a token id)."""
    if shap or (layer is not None and not _interpolates_input(method, neuron)):
        return None
    return base_arg


def _one_baseline(baseline: Any, baselines: Any) -> Any:
    if baseline is not None and baselines is not None:
        raise InputError("give baseline= or baselines= (the same argument), not both")
    return baselines if baselines is not None else baseline


def _check_method(method: str, layer: Any, neuron: Any, noise_tunnel: str | None, target: Target) -> None:
    """Every choice checked before any forward: the method fits the level (input, layer, neuron)."""
    if neuron is not None and layer is None:
        raise InputError("neuron= indexes a unit of a layer; give layer= (a hook name) as well")
    if layer is not None and noise_tunnel is not None:
        raise InputError("noise_tunnel= smooths input attributions; it does not combine with layer=")
    if noise_tunnel is not None and noise_tunnel not in bridge.NOISE_TUNNELS:
        raise InputError(
            f"unknown noise_tunnel {noise_tunnel!r}; choose one of {', '.join(bridge.NOISE_TUNNELS)}"
        )
    if neuron is not None:
        if target is not None:
            raise InputError("a neuron attribution explains the neuron= itself; drop target=")
        if method not in bridge.NEURON_METHODS:
            raise InputError(
                f"unknown neuron method {method!r}; choose one of {', '.join(bridge.NEURON_METHODS)}"
            )
    elif layer is not None:
        if method not in bridge.LAYER_METHODS:
            raise InputError(
                f"unknown layer method {method!r}; choose one of {', '.join(bridge.LAYER_METHODS)}"
            )
    elif method in bridge.NEURON_METHODS and method not in METHODS:
        raise InputError(f"{method} attributes one neuron: give layer= and neuron= (a unit of that layer)")
    elif method in bridge.LAYER_METHODS and method not in METHODS:
        raise InputError(f"{method} attributes to a layer: give layer= (a hook name, e.g. 'conv2.hook_out')")
    elif method not in METHODS:
        raise InputError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")


def _input_method(
    method: str,
    model: HookedModel,
    space: _Space,
    targets: torch.Tensor,
    base_arg: Any,
    noise_tunnel: str | None,
    nt_samples: int,
    stdevs: float,
    n_samples: int | None,
    feature_mask: torch.Tensor | None,
    n_steps: int,
    internal_batch_size: int | None,
    window: Sequence[int] | None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Input-level attributions: ``(values, delta, config)``."""
    extra = (*space.extra, targets)
    if noise_tunnel is not None and (not isinstance(nt_samples, int) or nt_samples < 1 or not stdevs >= 0):
        raise InputError(
            f"the noise tunnel needs nt_samples >= 1 and stdevs >= 0, got {nt_samples}, {stdevs}"
        )
    if method == "ig":
        chunk = _steps_per_chunk(internal_batch_size, space.x.shape[0], n_steps)
        config = {
            "n_steps": n_steps,
            "rule": "gausslegendre",
            "steps_per_forward": chunk,
            "library": "interp",
        }
        if noise_tunnel is not None:
            values = noise_tunnel_ig(
                space.forward,
                space.x,
                space.baseline,
                extra,
                n_steps,
                chunk,
                noise_tunnel,
                nt_samples,
                stdevs,
            )
            return values, None, config
        values, delta = integrated_gradients(space.forward, space.x, space.baseline, extra, n_steps, chunk)
        return values, delta, config
    noise = (
        None
        if noise_tunnel is None
        else {"nt_type": noise_tunnel, "nt_samples": nt_samples, "stdevs": stdevs}
    )
    if method in ("saliency", "grad_x_input", "occlusion") and noise is None:
        values, config = _captum(method, space, extra, window)
        return values, None, config
    kwargs, config = _method_kwargs(method, space, base_arg, n_samples, feature_mask, n_steps, window)
    forward = model.module if method in bridge.MODULE_METHODS else space.forward
    extra_args = () if method in bridge.MODULE_METHODS else space.extra
    values = bridge.input_attribution(method, forward, space.x, targets, extra_args, kwargs, noise)
    return values, None, config


def _method_kwargs(
    method: str,
    space: _Space,
    base_arg: Any,
    n_samples: int | None,
    feature_mask: torch.Tensor | None,
    n_steps: int,
    window: Sequence[int] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """captum keyword arguments for ``method`` and the settings recorded in the config."""
    if method == "saliency":
        return {"abs": True}, {}
    if method == "grad_x_input" or method in ("guided_backprop", "deconvolution"):
        return {}, {}
    if method == "occlusion":
        shape = _occlusion_window(space, window)
        return {"sliding_window_shapes": shape, "strides": space.stride, "baselines": space.baseline}, {
            "window": list(shape),
            "stride": list(space.stride),
        }
    if method == "deeplift":
        return {"baselines": space.baseline}, {}
    if method in bridge.SHAP_METHODS:
        dist = _distribution(method, base_arg, space.x)
        if method == "deeplift_shap":
            return {"baselines": dist}, {"n_baselines": len(dist)}
        n = 5 if n_samples is None else n_samples
        return {"baselines": dist, "n_samples": n, "stdevs": 0.0}, {"n_baselines": len(dist), "n_samples": n}
    mask = _feature_mask(space, feature_mask)
    if method == "feature_ablation":
        return {"baselines": space.baseline, "feature_mask": mask}, {}
    n = 25 if n_samples is None else n_samples  # captum's Lime and KernelShap default
    return {"baselines": space.baseline, "feature_mask": mask, "n_samples": n}, {"n_samples": n}


def _distribution(method: str, base_arg: Any, x: torch.Tensor) -> torch.Tensor:
    """A SHAP method's reference distribution ``[N, *example]`` (gradient_shap default: one zero)."""
    if base_arg is None:
        if method == "deeplift_shap":
            raise InputError(
                "deeplift_shap averages DeepLift over a reference distribution: give baselines= a "
                f"tensor of at least 2 reference inputs [N, {', '.join(map(str, x.shape[1:]))}]"
            )
        return torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist = torch.as_tensor(base_arg).to(x.device, x.dtype)
    if dist.ndim != x.ndim or tuple(dist.shape[1:]) != tuple(x.shape[1:]) or not torch.isfinite(dist).all():
        raise InputError(
            f"{method} baselines must be a finite distribution [N, {', '.join(map(str, x.shape[1:]))}], "
            f"got shape {tuple(dist.shape)}"
        )
    if method == "deeplift_shap" and len(dist) < 2:
        raise InputError("deeplift_shap needs baselines= of at least 2 reference inputs (captum's rule)")
    return dist


def _feature_mask(space: _Space, feature_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Images: the user's mask (None: every scalar its own feature); tokens: one feature per token."""
    if not space.window_free:  # tokens: every dimension of a token's embedding is one feature
        if feature_mask is not None:
            raise InputError("feature_mask= is for image models; a transformer's features are its tokens")
        pos, d = space.x.shape[1:]
        return repeat(torch.arange(pos, device=space.x.device), "p -> 1 p d", d=d)
    if feature_mask is None:
        return None
    mask = torch.as_tensor(feature_mask).long().to(space.x.device)
    try:
        torch.broadcast_shapes(mask.shape, space.x.shape)
    except RuntimeError:
        raise InputError(
            f"feature_mask of shape {tuple(mask.shape)} does not broadcast to the input {tuple(space.x.shape)}"
        ) from None
    return mask


def _layer_or_neuron(
    model: HookedModel,
    space: _Space,
    method: str,
    base_arg: Any,
    targets: torch.Tensor,
    layer: str | Sequence[str],
    neuron: Any,
    n_steps: int,
    internal_batch_size: int | None,
    config: dict[str, Any],
) -> Attribution:
    """Layer attributions (values at the layer) or neuron attributions (values at the input)."""
    if _interpolates_input(method, neuron):  # IG over the input space itself (pixels, embeddings)
        inputs, baselines, forward, extra = space.x, space.baseline, space.forward, space.extra
    else:  # the model's own input (images, or token ids whose layer activation is interpolated)
        (inputs, baselines), forward, extra = space.native(base_arg), space.plain, space.plain_extra
    run = lambda: forward(inputs, *extra)  # noqa: E731
    names, modules, to_input = bridge.layer_modules(model, layer, run)
    config.update(layer=names, side="input" if to_input else "output")
    if method in INTEGRATING:
        config["n_steps"] = n_steps
    if method == "gradcam" and model.kind == "transformer":
        raise InputError(
            "gradcam weighs a conv layer's channels by their mean gradient over space; a transformer "
            "layer's dim 1 is its positions, so every token would get one value. Use 'ig' or "
            "'conductance' with layer= for a per-token map"
        )
    acts = _activations(modules, to_input, run)
    for name, act in zip(names, acts, strict=True):
        if not act.is_floating_point():
            raise InputError(
                f"{name} carries {act.dtype} values (token ids or positions), which have no gradient "
                "to attribute with; pick a float layer after it (e.g. 'embed.hook_out')"
            )
    if neuron is not None:
        if len(names) > 1:
            raise InputError("a neuron attribution reads one layer; give one hook name")
        act = acts[0]
        index = bridge.check_neuron(neuron, tuple(act.shape[1:]), names[0])
        values = bridge.neuron_attribution(
            method, forward, modules[0], to_input, inputs, baselines, index, extra, n_steps,
            internal_batch_size,
        )  # fmt: skip
        config["neuron"] = list(index)
        return space.finish(values.detach(), method, targets, None, act[(slice(None), *index)], config)
    with torch.no_grad():
        out = run()
    found = bridge.layer_attribution(
        method, forward, modules, to_input, inputs, baselines, targets, extra, n_steps,
        internal_batch_size,
    )  # fmt: skip
    by_layer = {n: v.detach() for n, v in zip(names, found, strict=True)}
    return space.finish_layer(by_layer, method, targets, _select(out, targets), config)


def _interpolates_input(method: str, neuron: Any) -> bool:
    """Neuron methods and layer conductance integrate over the input (so a transformer's run on
    its embeddings); layer IG and Grad-CAM read the layer from the model's own input (token ids)."""
    return neuron is not None or method == "conductance"


def _activations(modules: Sequence[torch.nn.Module], to_input: bool, run: Callable) -> list[torch.Tensor]:
    """One forward's activation at each of ``modules`` (its input or output), under no_grad."""
    kept: dict[int, torch.Tensor] = {}

    def keeper(i: int) -> Callable:
        def keep(mod, args, out):
            value = args[0] if to_input else out
            kept.setdefault(i, (value[0] if isinstance(value, tuple) else value).detach())

        return keep

    handles = [module.register_forward_hook(keeper(i)) for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return [kept[i] for i in range(len(modules))]


def integrated_gradients(
    forward: Callable[..., torch.Tensor],
    x: torch.Tensor,
    baseline: torch.Tensor,
    extra: tuple[torch.Tensor, ...],
    n_steps: int,
    steps_per_chunk: int,
    delta: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """IG with the Gauss-Legendre rule, ``steps_per_chunk`` interpolation steps per forward.

    ``forward(x_batch, *extra_batch) -> [N]`` (one scalar per row); the per-example tensors in
    ``extra`` are repeated alongside. Returns ``(attributions, delta)``, delta per example. The
    gradient sum is accumulated in float64 so chunking does not change the result.
    """
    alphas, weights = _gauss_legendre(n_steps)
    diff = x - baseline
    total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for start in range(0, n_steps, steps_per_chunk):
        a = alphas[start : start + steps_per_chunk].to(x)
        w = weights[start : start + steps_per_chunk].to(torch.float64)
        shape = (-1,) + (1,) * x.ndim
        points = rearrange(baseline + a.view(shape) * diff, "s b ... -> (s b) ...").requires_grad_(True)
        rows = [repeat(e, "b ... -> (s b) ...", s=len(a)) for e in extra]
        with torch.enable_grad():
            (grads,) = torch.autograd.grad(forward(points, *rows).sum(), points)
        grads = rearrange(grads, "(s b) ... -> s b ...", s=len(a)).to(torch.float64)
        total += torch.einsum("s,s...->...", w, grads)
    attributions = (total * diff.to(torch.float64)).to(x.dtype)
    if not delta:
        return attributions, None
    with torch.no_grad():
        gap = forward(x, *extra) - forward(baseline, *extra)
    delta = reduce(attributions.double(), "b ... -> b", "sum") - gap.double()
    return attributions, delta


def noise_tunnel_ig(
    forward: Callable[..., torch.Tensor],
    x: torch.Tensor,
    baseline: torch.Tensor,
    extra: tuple[torch.Tensor, ...],
    n_steps: int,
    steps_per_chunk: int,
    nt_type: str,
    nt_samples: int,
    stdevs: float,
) -> torch.Tensor:
    """captum's ``NoiseTunnel(IntegratedGradients)`` streamed: the same noise draws (one
    ``torch.normal`` over the ``nt_samples`` copies of each example, sample index fastest, as
    captum's ``_add_noise_to_input``), then streamed IG over all noisy rows at once, so memory
    holds ``steps_per_chunk`` steps of ``B x nt_samples`` rows where captum holds all ``n_steps``.
    ``nt_type``: ``smoothgrad`` (mean), ``smoothgrad_sq`` (mean of squares), ``vargrad`` (variance).
    """
    size = (x.shape[0] * nt_samples, *x.shape[1:])
    noise = torch.normal(0, torch.tensor(stdevs, device=x.device).repeat(size))
    noisy = x.repeat_interleave(nt_samples, dim=0) + noise
    rows = tuple(e.repeat_interleave(nt_samples, dim=0) for e in extra)
    base = baseline.repeat_interleave(nt_samples, dim=0)
    values, _ = integrated_gradients(forward, noisy, base, rows, n_steps, steps_per_chunk, delta=False)
    per_sample = rearrange(values, "(b n) ... -> b n ...", n=nt_samples)
    mean, mean_sq = per_sample.mean(1), (per_sample**2).mean(1)
    return {"smoothgrad": mean, "smoothgrad_sq": mean_sq, "vargrad": mean_sq - mean**2}[nt_type]


def randomized(model: HookedModel, modules: Sequence[str] | None = None, seed: int = 0) -> HookedModel:
    """A copy of ``model`` whose ``modules`` (paths; default all) are re-initialized, seeded.

    The model-randomization sanity check (Adebayo et al. 2018): an attribution method that explains
    the model must give different maps for the randomized copy.
    """
    clone = copy.deepcopy(model)
    chosen = dict(clone.module.named_modules())
    names = list(modules) if modules is not None else [n for n in chosen if n]
    unknown = [n for n in names if n not in chosen]
    if unknown:
        raise InputError(f"no module named {unknown[0]!r}; modules: {', '.join(n for n in chosen if n)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            if hasattr(chosen[name], "reset_parameters"):
                chosen[name].reset_parameters()
    return clone


def model_randomization(
    model: HookedModel,
    inputs: Any,
    target: Target = None,
    method: str = "ig",
    *,
    modules: Sequence[str] | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> torch.Tensor:
    """The model-randomization sanity check for any method (and any ``attribute`` options): the
    Spearman rank correlation ``[B]`` between each example's map on ``model`` and on
    ``randomized(model, modules, seed)``, the target fixed to the trained model's. Near 1: the
    method ignores the randomized weights (Adebayo et al. 2018 found this for guided backprop when
    the top layer is randomized); near 0: the map depends on them."""
    trained = attribute(model, inputs, target, method, **kwargs)
    shuffled = attribute(randomized(model, modules, seed), inputs, trained.target, method, **kwargs)
    return _spearman(trained.values.flatten(1), shuffled.values.flatten(1))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman rank correlation of two ``[B, N]`` tensors (ties broken by order)."""
    ra, rb = a.argsort(-1).argsort(-1).double(), b.argsort(-1).argsort(-1).double()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-12)


# ------------------------------------------------------------------------------------------------
# Input spaces: what is attributed, and the forward from it to one scalar per row
# ------------------------------------------------------------------------------------------------


@dataclass
class _Space:
    """``x`` is attributed; ``forward(x_rows, *extra_rows, target_rows) -> [N]``."""

    x: torch.Tensor
    baseline: torch.Tensor
    forward: Callable[..., torch.Tensor]
    extra: tuple[torch.Tensor, ...]
    finish: Callable[..., Attribution]
    window: tuple[int, ...]
    stride: tuple[int, ...]
    window_free: bool = True  # False: the occlusion window is fixed (one token)
    # layer and neuron methods run on the model's own input (images, or token ids):
    plain: Callable[..., torch.Tensor] | None = None  # (inputs, *extra) -> [N, out]
    native: Callable[[Any], tuple[torch.Tensor, Any]] | None = None  # baseline arg -> (inputs, baselines)
    finish_layer: Callable[..., Attribution] | None = None
    module_ok: bool = True  # module methods (DeepLift...) may run on model.module directly
    plain_extra: tuple[torch.Tensor, ...] = ()  # the per-row arguments of ``plain`` after the input


def _image_space(model: HookedModel, inputs: Any, baseline: Any) -> _Space:
    x = model.prepare(inputs).detach()
    base = _check_baseline(baseline, x)

    def forward(rows: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        out = model._forward(rows)
        return out if targets is None else _select(out, targets)

    def finish(values, method, targets, delta, scalar, config) -> Attribution:
        kept = None if method == "saliency" else base
        return Attribution(values, method, targets, delta, x, kept, scalar, config=config)

    def native(base_arg: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return x, _check_baseline(base_arg, x)

    def finish_layer(by_layer, method, targets, scalar, config) -> Attribution:
        first = next(iter(by_layer.values()))
        return Attribution(first, method, targets, None, x, None, scalar, config=config, by_layer=by_layer)

    window = (x.shape[1], *([2] * (x.ndim - 2)))
    stride = (x.shape[1], *([1] * (x.ndim - 2)))
    module_ok = type(model)._forward is ModuleModel._forward
    return _Space(
        x, base, forward, (), finish, window, stride, True, model._forward, native, finish_layer, module_ok
    )


def _token_space(model: HookedModel, inputs: Any, baseline: Any, position: int | None) -> _Space:
    if EMBED_HOOK not in model.hook_names:
        raise InputError(f"{model.name} has no {EMBED_HOOK!r} hook, so its tokens cannot be attributed")
    tokens = model.prepare(inputs)
    ids = tokens.input_ids
    mask = tokens.attention_mask if tokens.attention_mask is not None else torch.ones_like(ids)
    mask = mask.to(ids.device)
    pos = _positions(mask, position)
    embed = _embed(model, ids, mask)
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        base = _embed(model, torch.full_like(ids, baseline), mask)
    else:
        base = _check_baseline(baseline, embed)

    def forward(rows, ids_rows, mask_rows, pos_rows, targets=None) -> torch.Tensor:
        from interp.models.transformer import Tokens

        with model.hooks([(EMBED_HOOK, lambda act, hook: rows)]):
            out = model._forward(Tokens(ids_rows, mask_rows))
        picked = out[torch.arange(out.shape[0], device=out.device), pos_rows]
        return picked if targets is None else _select(picked, targets)

    def finish(values, method, targets, delta, scalar, config) -> Attribution:
        # saliency: gradient norm; occlusion: every dim of a token carries the token's output drop
        # (lime, kernel_shap and feature ablation likewise give all of a token's dims one value)
        per_token = values.norm(dim=-1) if method == "saliency" else values.mean(-1)
        if method not in ("saliency", *PER_TOKEN_METHODS):
            per_token = values.sum(-1)
        per_token = per_token * mask
        strs = tokens.str_tokens or _str_tokens(model, ids, mask)
        kept = None if method == "saliency" else base
        config = {**config, "position": pos.tolist(), "embedding": EMBED_HOOK}
        return Attribution(
            per_token, method, targets, delta, ids, kept, scalar, strs, values, config, mask=mask
        )

    def plain(ids_rows, mask_rows, pos_rows) -> torch.Tensor:
        from interp.models.transformer import Tokens

        out = model._forward(Tokens(ids_rows, mask_rows))
        return out[torch.arange(out.shape[0], device=out.device), pos_rows]

    def native(base_arg: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if base_arg is None:
            base_arg = 0
        if not isinstance(base_arg, int) or isinstance(base_arg, bool):
            raise InputError(
                "layer and neuron attributions of a transformer take a token id as the baseline "
                f"(its activation at the layer is the reference), got {type(base_arg).__name__}"
            )
        return ids, torch.full_like(ids, base_arg)

    def finish_layer(by_layer, method, targets, scalar, config) -> Attribution:
        per_token = {n: reduce(v, "b p ... -> b p", "sum") * mask for n, v in by_layer.items()}
        first = next(iter(by_layer))
        strs = tokens.str_tokens or _str_tokens(model, ids, mask)
        config = {**config, "position": pos.tolist()}
        return Attribution(
            per_token[first],
            method,
            targets,
            None,
            ids,
            None,
            scalar,
            strs,
            by_layer[first],
            config,
            by_layer,
            mask,
        )

    d = embed.shape[-1]
    return _Space(
        embed, base, forward, (ids, mask, pos), finish, (1, d), (1, d), False, plain, native, finish_layer, False,
        (mask, pos),
    )  # fmt: skip


def _embed(model: HookedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from interp.models.transformer import Tokens

    _, cache = model.run_with_cache(Tokens(ids, mask), names=EMBED_HOOK, stop_early=True)
    return cache[EMBED_HOOK].detach()


def _str_tokens(model: HookedModel, ids: torch.Tensor, mask: torch.Tensor) -> list[list[str]]:
    """Token strings of the real tokens (ids as text when the model has no tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    rows = [row[m.bool()] for row, m in zip(ids, mask, strict=True)]
    return [tok.convert_ids_to_tokens(r) if tok is not None else [str(int(i)) for i in r] for r in rows]


def _positions(mask: torch.Tensor, position: int | None) -> torch.Tensor:
    """Each example's explained position: ``position``, or its last real token (the last 1 in the
    mask, so left padding counts as well as right padding)."""
    last = (mask.shape[1] - 1) - mask.long().flip(-1).argmax(-1)
    if position is None:
        return last
    if not -mask.shape[1] <= position < mask.shape[1]:
        raise InputError(f"position {position} is out of range for {mask.shape[1]} tokens")
    return torch.full_like(last, position % mask.shape[1])


def _check_baseline(baseline: Any, x: torch.Tensor) -> torch.Tensor:
    """Baseline as a tensor shaped like ``x``: finite and broadcastable, else an InputError."""
    if baseline is None:
        return torch.zeros_like(x)
    base = torch.as_tensor(np.asarray(baseline) if not isinstance(baseline, torch.Tensor) else baseline)
    base = base.to(x.device, x.dtype)
    if not torch.isfinite(base).all():
        raise InputError("the baseline contains NaN or infinite values; give a finite baseline (e.g. zeros)")
    try:
        return torch.broadcast_to(base, x.shape).clone()
    except RuntimeError:
        raise InputError(
            f"the baseline has shape {tuple(base.shape)}, which does not broadcast to the input's "
            f"{tuple(x.shape)}; give a number, one example's shape or the batch's shape"
        ) from None


def _targets(target: Target, out: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-example output indices, checked against the output's last axis."""
    if out.ndim != 2:
        raise InputError(
            f"an attribution explains one output per example, picked by target=; this model's output "
            f"is {list(out.shape)}, not [batch, outputs]. Attribute a unit of a layer instead "
            "(layer= and neuron=)"
        )
    size = out.shape[-1]
    if target is None:
        return out.argmax(-1)
    t = torch.as_tensor(target).long().to(out.device).flatten()
    if t.numel() == 1:
        t = t.expand(batch).clone()
    if t.numel() != batch:
        raise InputError(
            f"target has {t.numel()} entries for {batch} examples; give one int or one per example"
        )
    bad = t[(t < 0) | (t >= size)]
    if bad.numel():
        raise InputError(
            f"target index {int(bad[0])} is out of range: the output has {size} units (0-{size - 1})"
        )
    return t


def _select(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return out.gather(-1, targets.view(-1, 1)).squeeze(-1)


def _steps_per_chunk(internal_batch_size: int | None, batch: int, n_steps: int) -> int:
    if internal_batch_size is None:
        return min(n_steps, 8)
    if internal_batch_size < 1:
        raise InputError(f"internal_batch_size must be positive, got {internal_batch_size}")
    return max(1, min(n_steps, internal_batch_size // batch))


def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in [0, 1] and weights summing to 1 (captum's ``gausslegendre`` rule)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.tensor(0.5 * (nodes + 1)), torch.tensor(0.5 * weights)


def _occlusion_window(space: _Space, window: Sequence[int] | None) -> tuple[int, ...]:
    shape = tuple(window) if window is not None and space.window_free else space.window
    x = space.x
    if len(shape) != x.ndim - 1 or any(w < 1 or w > s for w, s in zip(shape, x.shape[1:], strict=True)):
        raise InputError(
            f"occlusion window {shape} must have one size in 1..n per input axis {tuple(x.shape[1:])}"
        )
    return shape


def _captum(
    method: str, space: _Space, extra: tuple[torch.Tensor, ...], window: Sequence[int] | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    from captum.attr import InputXGradient, Occlusion, Saliency

    x = space.x.clone().requires_grad_(method != "occlusion")
    if method == "saliency":
        return Saliency(space.forward).attribute(x, additional_forward_args=extra, abs=True), {}
    if method == "grad_x_input":
        return InputXGradient(space.forward).attribute(x, additional_forward_args=extra), {}
    shape = _occlusion_window(space, window)
    with torch.no_grad():
        values = Occlusion(space.forward).attribute(
            x,
            sliding_window_shapes=shape,
            strides=space.stride,
            baselines=space.baseline,
            additional_forward_args=extra,
            perturbations_per_eval=16,
        )
    return values, {"window": list(shape), "stride": list(space.stride)}
