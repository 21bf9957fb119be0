"""captum's attribution methods on a ``HookedModel``: interp hook names mapped to the modules
captum hooks, one call shape, and the checks that run before any expensive work.

Everything here passes through to captum (so each number is captum's on the same module), except
what ``attribution`` streams itself (integrated gradients, and the noise tunnel over it). Kept apart
from ``attribution`` so the dispatch tables stay small and the public module stays readable.

* input methods: ``deeplift``, ``deeplift_shap``, ``guided_backprop``, ``deconvolution`` (these
  replace the backward of the model's modules, so they need a plain ``nn.Module`` model: image
  models), ``gradient_shap``, ``lime``, ``kernel_shap``, ``feature_ablation`` (any model, through
  a forward function), and captum's ``NoiseTunnel`` over any of them;
* layer methods at any hook name (``LayerIntegratedGradients``, ``LayerConductance``,
  ``LayerGradCam``), several layers at once for layer IG;
* neuron methods (``NeuronIntegratedGradients``, ``NeuronGradient``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from interp.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from interp.models.base import HookedModel

MODULE_METHODS = ("deeplift", "deeplift_shap", "guided_backprop", "deconvolution")
FUNCTION_METHODS = ("gradient_shap", "lime", "kernel_shap", "feature_ablation")
SHAP_METHODS = ("deeplift_shap", "gradient_shap")  # baselines are a distribution [N, ...]
STOCHASTIC = ("gradient_shap", "lime", "kernel_shap")
LAYER_METHODS = ("ig", "conductance", "gradcam")
NEURON_METHODS = ("ig", "gradient")
NOISE_TUNNELS = ("smoothgrad", "smoothgrad_sq", "vargrad")


def captum_class(method: str) -> type:
    """The captum class of an input-level method."""
    import captum.attr as ca

    return {
        "deeplift": ca.DeepLift,
        "deeplift_shap": ca.DeepLiftShap,
        "guided_backprop": ca.GuidedBackprop,
        "deconvolution": ca.Deconvolution,
        "gradient_shap": ca.GradientShap,
        "lime": ca.Lime,
        "kernel_shap": ca.KernelShap,
        "feature_ablation": ca.FeatureAblation,
        "saliency": ca.Saliency,
        "grad_x_input": ca.InputXGradient,
        "occlusion": ca.Occlusion,
        "ig": ca.IntegratedGradients,
    }[method]


def input_attribution(
    method: str,
    forward: Callable[..., torch.Tensor] | nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    extra: tuple[torch.Tensor, ...],
    kwargs: dict[str, Any],
    noise: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``method`` from captum on ``x``; ``noise`` (``nt_type``, ``nt_samples``, ``stdevs``) wraps it
    in captum's ``NoiseTunnel``. ``forward`` is ``model.module`` for the module methods."""
    from captum.attr import NoiseTunnel

    algorithm = captum_class(method)(forward)
    call_kwargs = dict(kwargs, target=targets, additional_forward_args=extra or None)
    rows = x.clone().requires_grad_(method not in ("lime", "kernel_shap", "feature_ablation", "occlusion"))
    with warnings.catch_warnings():  # captum's notices that its hooks on the activations are temporary
        for notice in ("Setting forward, backward hooks and attributes", "Setting backward hooks on ReLU"):
            warnings.filterwarnings("ignore", message=notice)
        if noise is not None:
            return NoiseTunnel(algorithm).attribute(rows, **noise, **call_kwargs)
        return algorithm.attribute(rows, **call_kwargs)


# ------------------------------------------------------------------------------------------------
# Hook names -> modules
# ------------------------------------------------------------------------------------------------


def layer_modules(
    model: HookedModel, layers: str | Sequence[str], run: Callable[[], Any]
) -> tuple[list[str], list[nn.Module], bool]:
    """The hook names, the modules captum must hook for them, and whether they sit on the module's
    input (``attribute_to_layer_input``). Raises InputError for an unknown name, names on both
    sides of their modules, or a module the forward ``run()`` never reaches (checked by one forward
    under ``torch.no_grad``, before captum's)."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise InputError("layer= names no hook; give a hook name such as 'conv2.hook_out'")
    sites = model._sites
    resolved: list[str] = []
    for name in names:
        matches = model.resolve(name)
        if len(matches) != 1:
            raise InputError(
                f"layer={name!r} must name one hook, it matches {len(matches)}: {', '.join(matches[:5])}"
            )
        resolved.append(matches[0])
    chosen = [sites[n] for n in resolved]
    sides = {site.side for site in chosen}
    if len(sides) > 1:
        raise InputError(
            f"layers {', '.join(resolved)} mix module inputs and outputs (hook_in / hook_out); captum "
            "attributes to one side at a time: split them into two calls"
        )
    modules = [site.module for site in chosen]
    _check_reached(resolved, modules, run, sides == {"input"})
    return resolved, modules, sides == {"input"}


def _check_reached(
    names: list[str], modules: list[nn.Module], run: Callable[[], Any], to_input: bool
) -> None:
    """One forward: every module runs, and (input side) receives only tensors positionally: captum
    reads (and clones) every positional argument of a layer whose input it attributes."""
    seen: dict[int, bool] = {}

    def hook(i: int):
        def record(module: nn.Module, args: tuple, out: Any) -> None:
            seen[i] = bool(args) and all(isinstance(a, torch.Tensor) for a in args)

        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    missing = [n for i, n in enumerate(names) if i not in seen]
    if missing:
        raise InputError(
            f"the forward never reaches {missing[0]!r} (its module does not run on these inputs), so "
            "nothing can be attributed to it; pick a hook the forward computes (model.hook_names)"
        )
    keyword = [n for i, n in enumerate(names) if to_input and not seen[i]]
    if keyword:
        raise InputError(
            f"{keyword[0]!r} is its module's input, which the model passes by keyword or beside "
            "non-tensor arguments, and captum reads every positional input of the layer; use the "
            "previous module's output hook instead (e.g. blocks.N.hook_resid_pre = "
            "blocks.(N-1).hook_resid_post)"
        )


def layer_attribution(
    method: str,
    forward: Callable[..., torch.Tensor],
    modules: list[nn.Module],
    to_input: bool,
    inputs: torch.Tensor,
    baselines: torch.Tensor | None,
    targets: torch.Tensor,
    extra: tuple[torch.Tensor, ...],
    n_steps: int,
    internal_batch_size: int | None,
) -> list[torch.Tensor]:
    """captum's layer method; one tensor per layer (several only for layer IG)."""
    import captum.attr as ca

    common = {
        "target": targets,
        "additional_forward_args": extra or None,
        "attribute_to_layer_input": to_input,
    }
    if method == "ig":
        layer = modules if len(modules) > 1 else modules[0]
        result = ca.LayerIntegratedGradients(forward, layer).attribute(
            inputs, baselines=baselines, n_steps=n_steps, internal_batch_size=internal_batch_size, **common
        )
        return list(result) if len(modules) > 1 else [result]
    if len(modules) > 1:
        raise InputError(f"layer method {method!r} takes one layer; several layers at once need method='ig'")
    if method == "conductance":
        algorithm = ca.LayerConductance(forward, modules[0])
        return [
            algorithm.attribute(
                inputs,
                baselines=baselines,
                n_steps=n_steps,
                internal_batch_size=internal_batch_size,
                **common,
            )
        ]
    return [ca.LayerGradCam(forward, modules[0]).attribute(inputs, **common)]


def neuron_attribution(
    method: str,
    forward: Callable[..., torch.Tensor],
    module: nn.Module,
    to_input: bool,
    inputs: torch.Tensor,
    baselines: torch.Tensor | None,
    neuron: tuple[int, ...],
    extra: tuple[torch.Tensor, ...],
    n_steps: int,
    internal_batch_size: int | None,
) -> torch.Tensor:
    """captum's neuron method: the input attribution of one unit of a layer."""
    import captum.attr as ca

    common = {"additional_forward_args": extra or None, "attribute_to_neuron_input": to_input}
    if method == "gradient":
        return ca.NeuronGradient(forward, module).attribute(inputs, neuron, **common)
    return ca.NeuronIntegratedGradients(forward, module).attribute(
        inputs,
        neuron,
        baselines=baselines,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        **common,
    )


def check_neuron(neuron: Any, shape: tuple, layer: str) -> tuple[int, ...]:
    """``neuron`` as an index tuple into one example's activation at ``layer`` (shape without the
    batch axis), InputError when it does not fit."""
    index = (neuron,) if isinstance(neuron, int) else tuple(neuron) if isinstance(neuron, Sequence) else None
    if index is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in index):
        raise InputError(f"neuron= must be an int or a tuple of ints indexing {layer}, got {neuron!r}")
    if len(index) != len(shape) or any(not 0 <= i < s for i, s in zip(index, shape, strict=False)):
        raise InputError(
            f"neuron={index} does not index one unit of {layer}, whose activation per example has "
            f"shape {tuple(shape)}; give {len(shape)} indices within it"
        )
    return index
