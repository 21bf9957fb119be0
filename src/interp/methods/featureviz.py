"""Feature visualization by optimization (Olah et al. 2017), sized for small image models.

    >>> vis = render(model, channel("conv2.hook_out", range(32)))     # 32 channels, one run
    >>> vis.images.shape                                               # [32, 1, 8, 8]
    >>> vis = render(model, class_logit(range(10)), param="fourier")

An *objective* scores each image of the batch; the batch dimension carries different units, so
visualizing 32 channels costs one optimization, not 32 (lucent optimizes one unit per run). The
forward stops right after the deepest hooked layer unless the objective reads the output.

Objectives: ``neuron``, ``channel``, ``direction`` (any vector over a layer's feature axis, e.g. a
probe's weights), ``class_logit``, ``diversity`` (Gram-matrix dissimilarity across the batch) and
the regularizers ``total_variation`` and ``l2``; combine them with ``+``, ``-`` and ``*``.

Parameterizations: ``"pixel"`` or ``"fourier"`` (lucent's 1/f-scaled spectrum). Constraints:
``"box"`` (a sigmoid onto the model's input range), ``"l2"`` (the ball of ``radius``) or
``"none"``. Transformation robustness (``Transforms``): pad, jitter, scale and rotate sized for
8x8 inputs (lucent's defaults of pad 12 / jitter 8 assume 224 px), drawn from a seeded
``torch.Generator`` so a run is reproducible from its recorded config. ``transformed_scores``
measures that robustness afterwards (the objective under seeded random jitters), and ``tv`` the
high-frequency content of an image.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from interp.errors import InputError
from interp.hooks import StopForward

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from interp.models.base import HookedModel

Units = int | Sequence[int] | torch.Tensor
Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------------
# Objectives
# ------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What an objective reads: activations by hook name, the model output, the (untransformed) image."""

    acts: dict[str, torch.Tensor]
    output: torch.Tensor | None
    image: torch.Tensor


@dataclass
class Objective:
    """A score to maximize: ``fn(ctx)`` gives ``[B]`` (one per image) or a scalar (batch-wide).

    Attributes:
        names: hook names read; ``needs_output``: reads the model output.
        batch: the number of images the objective defines (its units), None if any.
        checks: ``check(model)`` functions that raise ``InputError`` for a bad unit or layer.
    """

    fn: Callable[[Context], torch.Tensor]
    description: str
    names: tuple[str, ...] = ()
    needs_output: bool = False
    batch: int | None = None
    checks: tuple[Callable[[HookedModel], None], ...] = ()

    def __call__(self, ctx: Context) -> torch.Tensor:
        return self.fn(ctx)

    def __add__(self, other: Objective) -> Objective:
        if self.batch and other.batch and self.batch != other.batch:
            raise InputError(f"cannot add objectives over {self.batch} and {other.batch} units")
        return Objective(
            lambda ctx: self(ctx) + other(ctx),
            f"{self.description} + {other.description}",
            tuple(dict.fromkeys(self.names + other.names)),
            self.needs_output or other.needs_output,
            self.batch or other.batch,
            self.checks + other.checks,
        )

    def __mul__(self, weight: float) -> Objective:
        return Objective(
            lambda ctx: weight * self(ctx),
            f"{weight:g}*({self.description})",
            self.names,
            self.needs_output,
            self.batch,
            self.checks,
        )

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return self * -1.0

    def __sub__(self, other: Objective) -> Objective:
        return self + (-other)


def _units(units: Units) -> torch.Tensor:
    t = torch.as_tensor(units if not isinstance(units, range) else list(units)).long().flatten()
    if t.numel() == 0:
        raise InputError("no units given; pass a unit index or a list of them")
    return t


def _shape_of(model: HookedModel, layer: str) -> tuple:
    (name,) = model.resolve(layer) if not any(c in layer for c in "*?[") else (layer,)
    shape = model.hook_shapes.get(name)
    if shape is None:
        raise InputError(f"the shape of {layer!r} is unknown; load the model with input_shape=...")
    return shape


def _check_units(
    layer: str, units: torch.Tensor, spatial: bool | None = None
) -> Callable[[HookedModel], None]:
    """A check: ``units`` index axis 1 of ``layer``; ``spatial=True`` also demands spatial axes."""

    def check(model: HookedModel) -> None:
        shape = _shape_of(model, layer)
        if spatial and len(shape) < 3:
            raise InputError(
                f"{layer} has no spatial dimensions (shape {tuple(shape)}), so it has no channel maps; "
                "use neuron(...) for its units, or pick a convolutional layer"
            )
        size = shape[1] if len(shape) > 1 else 1
        _check_range(units, size, f"{layer} has {size} units along axis 1")

    return check


def _check_range(units: torch.Tensor, size: int, what: str) -> None:
    bad = units[(units < 0) | (units >= size)]
    if bad.numel():
        raise InputError(f"unit index {int(bad[0])} is out of range: {what} (valid: 0-{size - 1})")


def channel(layer: str, units: Units) -> Objective:
    """Mean activation of channel ``units[b]`` over all positions, for image ``b``."""
    u = _units(units)

    def fn(ctx: Context) -> torch.Tensor:
        act = ctx.acts[layer]
        picked = act[torch.arange(act.shape[0]), u.to(act.device)]
        return reduce(picked, "b ... -> b", "mean")

    return Objective(
        fn, f"channel {layer}:{_fmt(u)}", (layer,), batch=len(u), checks=(_check_units(layer, u, True),)
    )


def neuron(layer: str, units: Units, at: Sequence[int] | None = None) -> Objective:
    """Activation of unit ``units[b]`` (axis 1) for image ``b``; for spatial layers at position
    ``at`` (default the centre), so a first-layer conv neuron sees one receptive field."""
    u = _units(units)

    def fn(ctx: Context) -> torch.Tensor:
        act = ctx.acts[layer]
        picked = act[torch.arange(act.shape[0]), u.to(act.device)]
        if picked.ndim == 1:
            return picked
        where = tuple(at) if at is not None else tuple(s // 2 for s in picked.shape[1:])
        return picked[(slice(None), *where)]

    return Objective(
        fn, f"neuron {layer}:{_fmt(u)}", (layer,), batch=len(u), checks=(_check_units(layer, u),)
    )


def direction(layer: str, vectors: Any) -> Objective:
    """Dot product of the feature axis (axis 1) with ``vectors`` (``[F]``, or ``[U, F]``: one per
    image), averaged over positions; any vector works, e.g. a linear probe's weight."""
    v = torch.as_tensor(np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors).float()
    if v.ndim not in (1, 2) or not torch.isfinite(v).all():
        raise InputError(
            f"direction vectors must be a finite [F] or [U, F] tensor, got shape {tuple(v.shape)}"
        )
    v2 = v.unsqueeze(0) if v.ndim == 1 else v

    def fn(ctx: Context) -> torch.Tensor:
        act = ctx.acts[layer]
        flat = rearrange(act, "b f ... -> b f (...)")
        return torch.einsum("bfp,bf->b", flat, v2.to(act).expand(act.shape[0], -1)) / flat.shape[-1]

    def check(model: HookedModel) -> None:
        shape = _shape_of(model, layer)
        if len(shape) < 2 or shape[1] != v2.shape[1]:
            raise InputError(
                f"direction has {v2.shape[1]} features but {layer} has shape {tuple(shape)} (features on axis 1)"
            )

    return Objective(
        fn, f"direction {layer}", (layer,), batch=len(v2) if v.ndim == 2 else None, checks=(check,)
    )


def class_logit(units: Units) -> Objective:
    """The model output (logit) ``units[b]`` for image ``b``."""
    u = _units(units)

    def fn(ctx: Context) -> torch.Tensor:
        out = ctx.output
        return out[torch.arange(out.shape[0]), u.to(out.device)]

    def check(model: HookedModel) -> None:
        size = _output_size(model)
        _check_range(u, size, f"the output has {size} classes")

    return Objective(fn, f"logit {_fmt(u)}", needs_output=True, batch=len(u), checks=(check,))


def diversity(layer: str, weight: float = 1.0) -> Objective:
    """Minus ``weight`` x the mean pairwise cosine of the images' Gram matrices at ``layer``."""

    def fn(ctx: Context) -> torch.Tensor:
        return -weight * gram_cosine(ctx.acts[layer])

    return Objective(
        fn,
        f"diversity {layer} x{weight:g}",
        (layer,),
        checks=(_check_units(layer, torch.zeros(1).long(), True),),
    )


def total_variation(weight: float = 1.0) -> Objective:
    """Minus ``weight`` x each image's total variation (sum of absolute neighbour differences)."""
    return Objective(lambda ctx: -weight * tv(ctx.image), f"tv x{weight:g}")


def l2(weight: float = 1.0) -> Objective:
    """Minus ``weight`` x each image's L2 norm around the middle of the input range."""
    return Objective(
        lambda ctx: -weight * reduce((ctx.image - 0.5) ** 2, "b ... -> b", "sum").sqrt(), f"l2 x{weight:g}"
    )


def gram_cosine(act: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the per-image Gram matrices of ``act`` ``[B, C, ...]``."""
    flat = rearrange(act, "b c ... -> b c (...)")
    grams = F.normalize(rearrange(torch.einsum("bcp,bdp->bcd", flat, flat), "b c d -> b (c d)"), dim=-1)
    sims = grams @ grams.T
    n = act.shape[0]
    if n < 2:
        raise InputError("diversity compares images of a batch; it needs a batch of at least 2")
    return (sims.sum() - sims.diagonal().sum()) / (n * (n - 1))


def tv(images: torch.Tensor) -> torch.Tensor:
    """Total variation per image ``[B]`` of a ``[B, ..., H, W]`` batch (anisotropic: the sum of
    absolute differences between vertical and horizontal neighbours, over all channels).

    A high-frequency measure: the noisy patterns an unregularized optimization finds have high
    total variation; blur, a TV penalty or transformation robustness lower it."""
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs()
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs()
    return reduce(dy, "b ... -> b", "sum") + reduce(dx, "b ... -> b", "sum")


def _fmt(u: torch.Tensor) -> str:
    return (
        str(int(u[0]))
        if len(u) == 1
        else f"[{', '.join(map(str, u[:6].tolist()))}{', ...' if len(u) > 6 else ''}]"
    )


def _output_size(model: HookedModel) -> int:
    with torch.no_grad(), model._internal():  # a shape probe: the user's hooks must not run on it
        out = model._forward(torch.zeros((1, *model.input_shape), device=model.device))
    return out.shape[-1]


# ------------------------------------------------------------------------------------------------
# Parameterizations and transforms
# ------------------------------------------------------------------------------------------------


class Param(torch.nn.Module):
    """Trainable image batch: ``pixel`` or ``fourier`` raw values, then the constraint."""

    def __init__(
        self,
        shape: tuple[int, ...],
        kind: str,
        constraint: str,
        bounds: tuple[float, float],
        radius: float | None,
        gen: torch.Generator,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if kind not in ("pixel", "fourier"):
            raise InputError(f"unknown parameterization {kind!r}; use 'pixel' or 'fourier'")
        if constraint not in ("box", "l2", "none"):
            raise InputError(f"unknown constraint {constraint!r}; use 'box', 'l2' or 'none'")
        if constraint == "l2" and (radius is None or not radius > 0):
            raise InputError("constraint='l2' needs a positive radius=")
        self.kind, self.constraint, self.bounds, self.radius, self.hw = (
            kind,
            constraint,
            bounds,
            radius,
            shape[-2:],
        )
        if kind == "pixel":
            self.raw = torch.nn.Parameter(torch.randn(shape, generator=gen) * init_std)
        else:
            h, w = self.hw
            freqs = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None] ** 2)
            self.register_buffer(
                "scale", torch.tensor(1.0 / np.maximum(freqs, 1.0 / max(h, w)), dtype=torch.float32)
            )
            self.raw = torch.nn.Parameter(
                torch.randn((*shape[:-2], *freqs.shape, 2), generator=gen) * init_std
            )

    def forward(self) -> torch.Tensor:
        raw = self.raw
        if self.kind == "fourier":
            spectrum = torch.view_as_complex(self.raw) * self.scale
            raw = torch.fft.irfft2(spectrum, s=self.hw, norm="ortho") / 4.0  # lucent's "magic" 4
        if self.constraint == "box":
            low, high = self.bounds
            return low + (high - low) * torch.sigmoid(raw)
        if self.constraint == "l2":
            norms = reduce(raw**2, "b ... -> b", "sum").sqrt().clamp_min(1e-12)
            return raw * (self.radius / norms).clamp(max=1.0).view(-1, *([1] * (raw.ndim - 1)))
        return raw


@dataclass
class Transforms:
    """Random pad+jitter, scale and rotation per image (one affine warp), for small inputs.

    The image is padded by ``pad`` pixels of ``fill`` (default: the low end of the input range),
    shifted by up to ``jitter`` whole pixels, scaled by one of ``scales`` and rotated by one of
    ``degrees``, then sampled back at the original size. Draws come from the run's generator.
    """

    pad: int = 1
    jitter: int = 1
    scales: tuple[float, ...] = tuple(1 + (i - 5) / 50 for i in range(11))  # 0.90 ... 1.10
    degrees: tuple[float, ...] = tuple(range(-10, 11)) + (0,) * 5
    fill: float | None = None

    def __call__(self, x: torch.Tensor, gen: torch.Generator, fill: float) -> torch.Tensor:
        b, _, h, w = x.shape
        value = fill if self.fill is None else self.fill
        padded = F.pad(x, [self.pad] * 4, value=value)
        hp, wp = padded.shape[-2:]
        shift = torch.randint(-self.jitter, self.jitter + 1, (b, 2), generator=gen).float()
        scale = torch.tensor(self.scales)[torch.randint(len(self.scales), (b,), generator=gen)]
        angle = torch.tensor(self.degrees, dtype=torch.float32)[
            torch.randint(len(self.degrees), (b,), generator=gen)
        ]
        rad = angle * math.pi / 180
        rot = torch.stack(
            [torch.stack([rad.cos(), -rad.sin()], -1), torch.stack([rad.sin(), rad.cos()], -1)], -2
        )
        linear = rot * torch.tensor([w / wp, h / hp]).view(1, 1, 2) / scale.view(-1, 1, 1)
        offset = 2 * shift / torch.tensor([wp, hp])
        theta = torch.cat([linear, offset.unsqueeze(-1)], -1).to(x)
        grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
        return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=False)


STANDARD = Transforms()
JITTER = Transforms(scales=(1.0,), degrees=(0.0,))
"""Whole-pixel shifts only (pad 1, jitter 1): the held-out check of ``transformed_scores``."""


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


@dataclass
class FeatureVisualization:
    """Optimized inputs, one per batch entry.

    Attributes:
        images: ``[B, *input_shape]`` on the model's input scale.
        scores: ``[B]`` the objective on the final images, without transforms (a batch-wide term
            such as diversity is added to every image's score).
        objective: its description; ``history``: the total loss every 16 steps.
        config: everything needed to reproduce the run (seed, steps, lr, param, transforms...).
    """

    images: torch.Tensor
    scores: torch.Tensor
    objective: str
    history: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def figure(self, titles: Sequence[str] | None = None) -> go.Figure:
        """The images side by side (channels averaged)."""
        titles = (
            list(titles)
            if titles is not None
            else [f"{i}: {s:.3g}" for i, s in enumerate(self.scores.tolist())]
        )
        return image_grid_figure([img.mean(0) for img in self.images], titles)


def render(
    model: HookedModel,
    objective: Objective,
    *,
    param: str = "pixel",
    constraint: str = "box",
    radius: float | None = None,
    transforms: Transforms | str | None = "standard",
    steps: int = 256,
    lr: float = 0.05,
    seed: int = 0,
    batch: int | None = None,
    progress: bool = False,
    callback: Progress | None = None,
) -> FeatureVisualization:
    """Optimize a batch of inputs to maximize ``objective`` (Adam, as lucent's ``render_vis``).

    Args:
        model: an image model with a known ``input_shape`` (e.g. ``interp.load("zoo:digits-cnn")``).
        objective: see the module docstring; its unit count sets the batch size.
        param: ``"pixel"`` or ``"fourier"``.
        constraint: ``"box"`` (sigmoid onto ``model.input_range``, default [0, 1]), ``"l2"``
            (``||x|| <= radius``) or ``"none"``.
        transforms: ``"standard"`` (``Transforms()``), a ``Transforms``, or None (no robustness).
        steps, lr: Adam steps and learning rate (lucent: 512 and 0.05).
        seed: seeds the initialization and every transform draw (``torch.Generator``).
        batch: images when the objective does not fix it (e.g. a direction shared by all + diversity).
        progress: show a tqdm bar. ``callback(step, steps)`` is called after each step (e.g. to
            drive a UI progress bar).
    """
    from tqdm.auto import tqdm

    _check_model(model)
    for check in objective.checks:
        check(model)
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    n = objective.batch or batch or 1
    tf = STANDARD if transforms == "standard" else transforms
    if tf is not None and not isinstance(tf, Transforms):
        raise InputError(f"transforms must be 'standard', None or a Transforms, got {transforms!r}")
    bounds = tuple(model.input_range) if getattr(model, "input_range", None) else (0.0, 1.0)
    gen = torch.Generator().manual_seed(seed)
    image = Param((n, *model.input_shape), param, constraint, bounds, radius, gen).to(model.device)
    opt = torch.optim.Adam(image.parameters(), lr=lr)
    history: list[float] = []
    with model.hooks(_readers(objective, store := {})):
        for step in tqdm(range(steps), desc="feature vis", disable=not progress):
            x = image()
            seen = tf(x, gen, bounds[0]) if tf is not None else x
            loss = -objective(_run(model, objective, seen, x, store)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 16 == 0 or step == steps - 1:
                history.append(loss.item())
            if callback is not None:
                callback(step + 1, steps)
        with torch.no_grad():
            final = image()
            scores = _per_image(objective, _run(model, objective, final, final, store), n)
    config = {
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "param": param,
        "constraint": constraint,
        "radius": radius,
        "transforms": None if tf is None else vars(tf) | {"fill": bounds[0] if tf.fill is None else tf.fill},
        "batch": n,
        "optimizer": "Adam",
    }
    return FeatureVisualization(final.detach(), scores.detach(), objective.description, history, config)


def visualize(
    model: HookedModel, layer: str, units: Units | None = None, kind: str = "channel", **kwargs: Any
) -> FeatureVisualization:
    """``render`` of ``kind`` ("channel" or "neuron") for ``units`` of ``layer`` (default all), batched."""
    if kind not in ("channel", "neuron"):
        raise InputError(f"kind must be 'channel' or 'neuron', got {kind!r}")
    shape = _shape_of(model, layer)
    if units is None:
        units = range(shape[1] if len(shape) > 1 else 1)
    build = channel if kind == "channel" else neuron
    return render(model, build(layer, units), **kwargs)


def transformed_scores(
    model: HookedModel,
    objective: Objective,
    images: torch.Tensor,
    *,
    transforms: Transforms | str = "jitter",
    draws: int = 100,
    seed: int = 0,
) -> torch.Tensor:
    """The objective on ``draws`` randomly transformed copies of ``images``: ``[draws, B]``.

    Measures transformation robustness: an image that scores high only at one exact pixel
    alignment is a brittle, adversarial-like pattern rather than the feature itself, so its score
    collapses when it is shifted. Compare ``scores.mean(0)`` of two renders of the same objective,
    e.g. with and without ``transforms=``.

    Args:
        model: the model the images were optimized for.
        objective: scored on every transformed batch (a batch-wide term is given to every image).
        images: ``[B, *input_shape]``, e.g. ``render(...).images``.
        transforms: ``"jitter"`` (``JITTER``: shifts of up to one pixel), ``"standard"`` (the
            render default: also scale and rotate) or any ``Transforms``.
        draws: how many transformed batches; each image gets its own draw in every batch.
        seed: seeds every draw (``torch.Generator``), so the result is reproducible.
    """
    _check_model(model)
    for check in objective.checks:
        check(model)
    tf = _named_transforms(transforms)
    if not isinstance(draws, int) or draws < 1:
        raise InputError(f"draws must be a positive integer, got {draws!r}")
    images = _check_images(model, objective, images)
    fill = tuple(model.input_range)[0] if getattr(model, "input_range", None) else 0.0
    gen = torch.Generator().manual_seed(seed)
    store: dict[str, torch.Tensor] = {}
    scores = []
    with torch.no_grad(), model.hooks(_readers(objective, store)):
        for _ in range(draws):
            seen = tf(images, gen, fill)
            scores.append(_per_image(objective, _run(model, objective, seen, images, store), len(images)))
    return torch.stack(scores)


def _named_transforms(transforms: Transforms | str) -> Transforms:
    """``"jitter"`` -> ``JITTER``, ``"standard"`` -> ``STANDARD``, a ``Transforms`` as it is."""
    tf = (
        {"jitter": JITTER, "standard": STANDARD}.get(transforms)
        if isinstance(transforms, str)
        else transforms
    )
    if not isinstance(tf, Transforms):
        raise InputError(f"transforms must be 'jitter', 'standard' or a Transforms, got {transforms!r}")
    return tf


def _check_images(model: HookedModel, objective: Objective, images: torch.Tensor) -> torch.Tensor:
    """``images`` as a float tensor on the model's device, after checking its shape against the
    model's input shape and the objective's unit count."""
    images = torch.as_tensor(images).float().to(model.device)
    expected = tuple(model.input_shape)
    if images.ndim != len(expected) + 1 or tuple(images.shape[1:]) != expected:
        raise InputError(
            f"images must have shape [B, {', '.join(map(str, expected))}], got {tuple(images.shape)}"
        )
    if objective.batch and len(images) != objective.batch:
        raise InputError(f"the objective has {objective.batch} units but {len(images)} images were given")
    return images


def _check_model(model: HookedModel) -> None:
    if model.kind == "transformer":
        raise InputError(
            "feature visualization optimizes a continuous input, and a transformer reads discrete tokens; "
            "use dataset examples (interp.methods.examples.top_k) for transformer units"
        )
    if getattr(model, "input_shape", None) is None:
        raise InputError(f"{model.name} has no input_shape; load it with input_shape=(C, H, W)")


def _readers(objective: Objective, store: dict[str, torch.Tensor]) -> list:
    """Hooks that keep the objective's activations; the forward stops after the last one unless
    the objective needs the output."""
    wanted = set(objective.names)

    def make(name: str):
        def read(act: torch.Tensor, hook: Any) -> None:
            store[name] = act
            if not objective.needs_output and wanted <= store.keys():
                raise StopForward

        return read

    return [(name, make(name)) for name in objective.names]


def _run(
    model: HookedModel, objective: Objective, seen: torch.Tensor, image: torch.Tensor, store: dict
) -> Context:
    store.clear()
    output = None
    with contextlib.suppress(StopForward):  # raised once every hooked activation is read
        output = model._forward(seen)  # no range check: an l2-constrained input may leave it
    return Context(dict(store), output, image)


def _per_image(objective: Objective, ctx: Context, n: int) -> torch.Tensor:
    value = objective(ctx)
    return value if value.ndim == 1 else value.expand(n)


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


def image_grid_figure(
    panels: Sequence[Any],
    titles: Sequence[str],
    *,
    diverging: Sequence[bool] | None = None,
    columns: int = 8,
) -> go.Figure:
    """2-D arrays as heatmaps in a grid (greys; ``diverging`` panels red-blue centred on 0)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(panels)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=[str(t) for t in titles], horizontal_spacing=0.02
    )
    for i, panel in enumerate(panels):
        array = np.asarray(panel.detach().cpu() if isinstance(panel, torch.Tensor) else panel, dtype=float)
        div = bool(diverging[i]) if diverging is not None else False
        bound = float(np.abs(array).max()) or 1.0
        heat = go.Heatmap(
            z=array[::-1],
            colorscale="RdBu" if div else "Greys",
            reversescale=not div,
            zmid=0 if div else None,
            zmin=-bound if div else None,
            zmax=bound if div else None,
            showscale=div,
        )
        fig.add_trace(heat, row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, scaleanchor=None)
    fig.update_layout(height=max(220, 180 * rows), margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig
