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

Parameterizations: ``"pixel"``, ``"fourier"`` (lucent's 1/f-scaled spectrum) or ``"cppn"``
(lucent's compositional pattern-producing network, one per image), each optionally in lucent's
decorrelated colour space (``decorrelate=True``, RGB inputs). Constraints: ``"box"`` (the model's
input range: pixels are clipped into it after each Adam step, so none saturates and linear units
reach their analytic optimum; other parameterizations use a sigmoid), ``"sigmoid"``, ``"l2"`` (the
ball of ``radius``) or ``"none"``. Objectives may also be ``"layer:unit"`` strings
(``as_objective``: ``"conv2.hook_out:3"``), and they add, subtract and scale by numbers.

Transformation robustness: ``Transforms`` (the default ``"standard"``: pad, jitter, scale and
rotate per image in one affine warp, sized for 8x8 inputs: lucent's defaults of pad 12 / jitter 8
assume 224 px), or a list of lucent's transforms in order (``pad``, ``jitter``, ``random_scale``,
``random_rotate``; ``lucent_transforms()`` is its standard list scaled to 8 px; called with the
model's input range, they fill as lucent does on [0, 1]: constant padding mid-grey, pixels that
jitter, scale or rotate vacate the low end). Every draw comes from a seeded ``torch.Generator`` so a
run is reproducible from its recorded config.
``transformed_scores`` measures that robustness afterwards (the objective under seeded random
jitters), and ``tv`` the high-frequency content of an image.
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
from einops import rearrange, reduce, repeat

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

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, int | float):
            return Objective(
                lambda ctx: self(ctx) + other,
                f"{self.description} + {other:g}",
                self.names,
                self.needs_output,
                self.batch,
                self.checks,
            )
        if not isinstance(other, Objective):
            return NotImplemented
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

    __radd__ = __add__

    def __mul__(self, weight: float) -> Objective:
        if not isinstance(weight, int | float):
            raise InputError(
                f"an objective scales by a number, got {type(weight).__name__}; add objectives with +"
            )
        return Objective(
            lambda ctx: weight * self(ctx),
            f"{weight:g}*({self.description})",
            self.names,
            self.needs_output,
            self.batch,
            self.checks,
        )

    __rmul__ = __mul__

    def __truediv__(self, weight: float) -> Objective:
        if not isinstance(weight, int | float) or weight == 0:
            raise InputError(f"an objective divides by a non-zero number, got {weight!r}")
        return self * (1.0 / weight)

    def __neg__(self) -> Objective:
        return self * -1.0

    def __sub__(self, other: Objective | float) -> Objective:
        return self + (-other)

    def __rsub__(self, other: float) -> Objective:
        return (-self) + other

    @staticmethod
    def sum(objectives: Sequence[Objective]) -> Objective:
        """The sum of ``objectives`` (lucent's ``Objective.sum``)."""
        if not objectives:
            raise InputError("Objective.sum needs at least one objective")
        total = objectives[0]
        for other in objectives[1:]:
            total = total + other
        return total


def as_objective(spec: Objective | str) -> Objective:
    """An objective, or a ``"layer:unit"`` string (lucent's ``as_objective``): the hook name, a
    colon and a unit index, or several (``"conv2.hook_out:3"``, ``"conv2.hook_out:0,4,9"``,
    ``"conv2.hook_out:0-31"``). Spatial layers give ``channel``, others ``neuron``; ``"output:3"``
    (or ``"logits:3"``) is ``class_logit(3)``. Checked against the model when rendered."""
    if isinstance(spec, Objective):
        return spec
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise InputError(
            f"an objective is an Objective or a 'layer:unit' string such as 'conv2.hook_out:3', got {spec!r}"
        )
    layer, _, units_text = spec.rpartition(":")
    layer = layer.strip()
    try:
        units = parse_units(units_text)
    except ValueError:
        raise InputError(
            f"{spec!r}: the part after ':' must be unit indices ('3', '0,4,9' or '0-31'), got {units_text!r}"
        ) from None
    if layer in ("output", "logits"):
        return class_logit(units)
    return _layer_unit(layer, units, spec)


def parse_units(text: str) -> list[int]:
    """Unit indices as a "layer:unit" string writes them: ``"3"``, ``"0,4,9"``, ``"0-31"`` (ValueError otherwise)."""
    units: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            units.extend(range(int(lo), int(hi) + 1))
        else:
            units.append(int(part))
    if not units:
        raise ValueError(text)
    return units


def _layer_unit(layer: str, units: list[int], spec: str) -> Objective:
    """``channel`` of a spatial layer or ``neuron`` of a flat one, decided at the first check."""
    u = _units(units)
    chosen: dict[str, Objective] = {}

    def pick(model: HookedModel) -> Objective:
        if "objective" not in chosen:
            spatial = len(_shape_of(model, layer)) >= 3
            chosen["objective"] = channel(layer, u) if spatial else neuron(layer, u)
        return chosen["objective"]

    def check(model: HookedModel) -> None:
        for inner in pick(model).checks:
            inner(model)

    def fn(ctx: Context) -> torch.Tensor:
        if "objective" not in chosen:  # called without a model check: decide from the activation
            act = ctx.acts[layer]
            chosen["objective"] = channel(layer, u) if act.ndim >= 3 else neuron(layer, u)
        return chosen["objective"](ctx)

    return Objective(fn, spec, (layer,), batch=len(u), checks=(check,))


def _units(units: Units) -> torch.Tensor:
    t = torch.as_tensor(units if not isinstance(units, range) else list(units)).long().flatten()
    if t.numel() == 0:
        raise InputError("no units given; pass a unit index or a list of them")
    return t


def _shape_of(model: HookedModel, layer: str) -> tuple:
    names = [layer] if layer in model.hook_shapes else model.resolve(layer)
    if len(names) != 1:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise InputError(
            f"an objective names one hook, and {layer!r} is a pattern (it matches {len(names)}: {shown}); "
            "name one of them"
        )
    (name,) = names
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
    if out.ndim != 2:
        raise InputError(
            f"'output:' objectives are class logits, but {model.name}'s output is {list(out.shape)} per "
            "image, not [batch, classes]; optimize a unit of a layer ('layer:unit') instead"
        )
    return out.shape[-1]


# ------------------------------------------------------------------------------------------------
# Parameterizations and transforms
# ------------------------------------------------------------------------------------------------


PARAMS = ("pixel", "fourier", "cppn")
CONSTRAINTS = ("box", "sigmoid", "l2", "none")

# lucent's colour decorrelation (param/color.py): the square root of ImageNet's colour covariance,
# scaled so its largest column norm is 1; an image is optimized in these decorrelated coordinates.
_COLOR_SVD_SQRT = np.asarray([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_CORRELATION = torch.tensor(
    _COLOR_SVD_SQRT / np.max(np.linalg.norm(_COLOR_SVD_SQRT, axis=0)), dtype=torch.float32
)


class Param(torch.nn.Module):
    """Trainable image batch: raw values (``pixel``, ``fourier`` or ``cppn``), optional colour
    decorrelation, then the constraint.

    ``constraint="box"`` keeps images in the input range without saturating: a pixel
    parameterization holds the pixels themselves and ``project()`` clips them into the box after
    every optimizer step (projected Adam), so a pixel pinned at a bound moves off it as soon as the
    gradient turns; every other parameterization goes through a sigmoid onto the box (lucent's
    ``to_valid_rgb``), as does ``constraint="sigmoid"`` for every parameterization.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        kind: str,
        constraint: str,
        bounds: tuple[float, float],
        radius: float | None,
        gen: torch.Generator,
        init_std: float = 0.01,
        decorrelate: bool = False,
    ) -> None:
        super().__init__()
        _check_param(kind, constraint, radius, decorrelate, shape)
        self.kind, self.constraint, self.bounds, self.radius = kind, constraint, bounds, radius
        self.hw, self.decorrelate = shape[-2:], decorrelate
        self.clipped = kind == "pixel" and constraint == "box" and not decorrelate
        if kind == "pixel":
            raw = torch.randn(shape, generator=gen) * init_std
            if self.clipped:  # the pixels themselves, starting at the middle of the box
                low, high = bounds
                raw = (low + high) / 2 + (high - low) * raw
            self.raw = torch.nn.Parameter(raw)
        elif kind == "fourier":
            h, w = self.hw
            freqs = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None] ** 2)
            self.register_buffer(
                "scale", torch.tensor(1.0 / np.maximum(freqs, 1.0 / max(h, w)), dtype=torch.float32)
            )
            self.raw = torch.nn.Parameter(
                torch.randn((*shape[:-2], *freqs.shape, 2), generator=gen) * init_std
            )
        else:
            self.cppn = CPPN(shape, gen)

    def image(self) -> torch.Tensor:
        """The unconstrained image ``[B, C, H, W]`` (before colour decorrelation and the box)."""
        if self.kind == "cppn":
            return self.cppn()
        if self.kind == "fourier":
            spectrum = torch.view_as_complex(self.raw) * self.scale
            return torch.fft.irfft2(spectrum, s=self.hw, norm="ortho") / 4.0  # lucent's "magic" 4
        return self.raw

    def forward(self) -> torch.Tensor:
        raw = self.image()
        if self.clipped:
            return raw
        if self.decorrelate:
            raw = torch.einsum("bchw,dc->bdhw", raw, COLOR_CORRELATION.to(raw))
        if self.constraint in ("box", "sigmoid"):
            low, high = self.bounds
            return low + (high - low) * torch.sigmoid(raw)
        if self.constraint == "l2":
            norms = reduce(raw**2, "b ... -> b", "sum").sqrt().clamp_min(1e-12)
            return raw * (self.radius / norms).clamp(max=1.0).view(-1, *([1] * (raw.ndim - 1)))
        return raw

    @torch.no_grad()
    def project(self) -> None:
        """After an optimizer step: clip a clipped pixel parameterization back into the box."""
        if self.clipped:
            self.raw.clamp_(*self.bounds)


def _check_param(
    kind: str, constraint: str, radius: float | None, decorrelate: bool, shape: tuple[int, ...]
) -> None:
    if kind not in PARAMS:
        raise InputError(f"unknown parameterization {kind!r}; use one of {', '.join(PARAMS)}")
    if constraint not in CONSTRAINTS:
        raise InputError(f"unknown constraint {constraint!r}; use one of {', '.join(CONSTRAINTS)}")
    if constraint == "l2" and (radius is None or not radius > 0):
        raise InputError("constraint='l2' needs a positive radius=")
    if kind in ("cppn", "fourier") and len(shape) != 4:
        raise InputError(
            f"param={kind!r} draws images, but the input shape is {tuple(shape[1:])}, not (C, H, W); "
            "use param='pixel' for a non-image input"
        )
    if decorrelate and (len(shape) != 4 or shape[1] != 3):
        raise InputError(
            f"decorrelate=True decorrelates RGB colour, but the input shape is {tuple(shape[1:])}; "
            "it needs 3 channels (C=3, H, W)"
        )


class CompositeActivation(torch.nn.Module):
    """lucent's CPPN activation: ``atan(x)`` as ``[atan/0.67, atan^2/0.6]`` (channels double)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.atan(x)
        return torch.cat([x / 0.67, (x * x) / 0.6], 1)


class CPPN(torch.nn.Module):
    """A compositional pattern-producing network per image (lucent's ``param.cppn``): 1x1 layers
    over the (x, y) coordinates in [-sqrt(3), sqrt(3)], ``CompositeActivation`` between them,
    weights ~ N(0, 1/fan_in), zero biases and a zero last layer; one independent network per image
    of the batch (batched matrices, so ``B`` networks cost one forward)."""

    def __init__(
        self, shape: tuple[int, ...], gen: torch.Generator, hidden: int = 24, layers: int = 8
    ) -> None:
        super().__init__()
        b, c, h, w = shape
        r = 3**0.5
        ys, xs = torch.linspace(-r, r, h), torch.linspace(-r, r, w)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # lucent: x runs down the rows
        self.register_buffer("coords", repeat(grid, "k h w -> b k h w", b=b))
        self.weights, self.biases = torch.nn.ParameterList(), torch.nn.ParameterList()
        for i in range(layers):
            fan_in = 2 if i == 0 else 2 * hidden
            out = c if i == layers - 1 else hidden
            weight = torch.randn((b, out, fan_in), generator=gen) * math.sqrt(1 / fan_in)
            self.weights.append(torch.nn.Parameter(weight if i < layers - 1 else weight * 0))
            self.biases.append(torch.nn.Parameter(torch.zeros(b, out, 1, 1)))
        self.act = CompositeActivation()

    def forward(self) -> torch.Tensor:
        x = self.coords
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.einsum("boi,bihw->bohw", weight, x) + bias
            if i < len(self.weights) - 1:
                x = self.act(x)
        return x  # the box (sigmoid) is applied by Param, as lucent's output Sigmoid


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


# lucent's composable transforms (optvis/transform.py), same order and meaning. Each is called as
# ``t(x, gen, box)`` with ``box`` the model's input range ``(low, high)`` (a user's own transform in
# the list gets the same) and draws ONE value per call for the whole batch from ``gen`` (as lucent
# draws one per step), so unit b's image in a batched run equals a run of unit b alone with the same
# seed. lucent works on [0, 1] images: its constant pad is 0.5, mid-grey, and the pixels its
# translate, resize and kornia warp vacate are 0, black, the low end. Ours fill the same places with
# the same points of ``box`` (``mid_grey(box)``, ``box[0]``), so a [-1, 1] model gets black, not the
# grey a literal 0 would be. A list is applied in order; ``render`` then fits the result to the
# model's input size.

Box = tuple[float, float]
UNIT_BOX: Box = (0.0, 1.0)
"""lucent's image range: a transform called without a box behaves exactly as lucent's."""


def mid_grey(box: Box) -> float:
    """The middle of ``box`` (lucent's 0.5 on [0, 1]): what constant padding fills with."""
    low, high = box
    return (low + high) / 2


def _choice(options: Sequence[float], gen: torch.Generator) -> float:
    return options[int(torch.randint(len(options), (1,), generator=gen))]


@dataclass
class Pad:
    """``pad(width, mode, value)``: ``F.pad`` by ``width`` pixels on every side. ``mode``
    ``"reflect"`` (lucent's default) or ``"constant"`` with ``value`` (default: ``mid_grey(box)``,
    mid-grey of the input range, as lucent's ``constant_value=0.5`` on its [0, 1] images)."""

    width: int
    mode: str = "reflect"
    value: float | None = None

    def __call__(self, x: torch.Tensor, gen: torch.Generator, box: Box = UNIT_BOX) -> torch.Tensor:
        if self.mode != "constant":
            return F.pad(x, [self.width] * 4, mode=self.mode)
        return F.pad(x, [self.width] * 4, value=mid_grey(box) if self.value is None else self.value)


@dataclass
class Jitter:
    """``jitter(d)``: translate by whole pixels ``(dx, dy)``, each drawn from ``0..d-1`` (right and
    down), vacated pixels the low end of ``box``, as lucent's ``translate`` (0 on [0, 1]) with
    integer shifts."""

    d: int

    def __call__(self, x: torch.Tensor, gen: torch.Generator, box: Box = UNIT_BOX) -> torch.Tensor:
        dx, dy = (int(v) for v in torch.randint(self.d, (2,), generator=gen))
        return shift(x, dx, dy, fill=box[0])


@dataclass
class RandomScale:
    """``random_scale(scales)``: bilinear resize (align_corners=True) to ``ceil(scale * size)``,
    then padding of ``ceil((size - new) / 2)`` per side when it shrank, with the low end of ``box``
    (lucent's 0 on [0, 1])."""

    scales: tuple[float, ...]

    def __call__(self, x: torch.Tensor, gen: torch.Generator, box: Box = UNIT_BOX) -> torch.Tensor:
        return scale_image(x, _choice(self.scales, gen), fill=box[0])


@dataclass
class RandomRotate:
    """``random_rotate(angles)``: rotate by one of ``angles`` degrees (counter-clockwise as seen)
    about the centre ``((W-1)/2, (H-1)/2)``, bilinear, the low end of ``box`` outside (lucent's
    kornia warp, 0 on [0, 1])."""

    angles: tuple[float, ...]

    def __call__(self, x: torch.Tensor, gen: torch.Generator, box: Box = UNIT_BOX) -> torch.Tensor:
        return rotate_image(x, _choice(self.angles, gen), fill=box[0])


def pad(width: int, mode: str = "reflect", value: float | None = None) -> Pad:
    """lucent's ``transform.pad``; see ``Pad``."""
    if not isinstance(width, int) or width < 0 or mode not in ("reflect", "constant", "replicate"):
        raise InputError(
            f"pad needs a width >= 0 and mode 'reflect', 'constant' or 'replicate'; got {width!r}, {mode!r}"
        )
    return Pad(width, mode, value)


def jitter(d: int) -> Jitter:
    """lucent's ``transform.jitter``: shifts of ``0..d-1`` pixels (lucent asserts ``d > 1``)."""
    if not isinstance(d, int) or d < 1:
        raise InputError(f"jitter needs a positive whole number of pixels, got {d!r}")
    return Jitter(d)


def random_scale(scales: Sequence[float]) -> RandomScale:
    """lucent's ``transform.random_scale``; see ``RandomScale``."""
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise InputError(f"random_scale needs positive scale factors, got {scales!r}")
    return RandomScale(scales)


def random_rotate(angles: Sequence[float]) -> RandomRotate:
    """lucent's ``transform.random_rotate`` (degrees); see ``RandomRotate``."""
    angles = tuple(float(a) for a in angles)
    if not angles:
        raise InputError("random_rotate needs at least one angle (degrees)")
    return RandomRotate(angles)


def shift(x: torch.Tensor, dx: int, dy: int, fill: float = 0.0) -> torch.Tensor:
    """``x`` moved ``dx`` pixels right and ``dy`` down (negative: left/up), ``fill`` where vacated."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, fill)
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


def scale_image(x: torch.Tensor, factor: float, fill: float = 0.0) -> torch.Tensor:
    """lucent's ``random_scale`` at one factor, padding a shrunk image with ``fill`` (see ``RandomScale``)."""
    h, w = x.shape[-2:]
    new_h, new_w = math.ceil(factor * h), math.ceil(factor * w)
    out = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=True)
    pad_x, pad_y = max(0, math.ceil((w - new_w) / 2)), max(0, math.ceil((h - new_h) / 2))
    return F.pad(out, [pad_x, pad_x, pad_y, pad_y], value=fill)


def rotate_image(x: torch.Tensor, degrees: float, fill: float = 0.0) -> torch.Tensor:
    """``x`` rotated ``degrees`` counter-clockwise (as displayed, y down) about its centre; ``fill``
    outside. Sampling is linear with zeros outside, so warping ``x - fill`` and adding ``fill`` back
    is sampling ``x`` with ``fill`` outside (bilinear weights sum to 1)."""
    h, w = x.shape[-2:]
    rad = math.radians(degrees)
    c, s = math.cos(rad), math.sin(rad)
    # output pixel p (relative to the centre) samples the input at R(-angle) p; in normalized
    # coordinates (align_corners=True: -1/+1 are the outer pixel centres) x and y scale apart
    sx, sy = max(w - 1, 1) / 2, max(h - 1, 1) / 2
    theta = torch.tensor([[c, -s * sy / sx, 0.0], [s * sx / sy, c, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=True)
    warped = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return warped + fill


def fit(x: torch.Tensor, size: Sequence[int], fill: float) -> torch.Tensor:
    """``x`` centre-cropped (or padded with ``fill``) to ``size`` (H, W): the model reads a fixed
    input size, where lucent upsamples to 224 for models that take any size."""
    out = x
    for axis, want in zip((-2, -1), size, strict=True):
        have = out.shape[axis]
        if have > want:
            out = out.narrow(axis, (have - want) // 2, want)
        elif have < want:
            before = (want - have) // 2
            widths = [0, 0, before, want - have - before] if axis == -2 else [before, want - have - before]
            out = F.pad(out, widths, value=fill)
    return out


def compose(transforms: Sequence[Callable]) -> Callable:
    """The transforms applied in order, as lucent's ``transform.compose``."""
    steps = list(transforms)

    def run(x: torch.Tensor, gen: torch.Generator, box: Box = UNIT_BOX) -> torch.Tensor:
        for t in steps:
            x = t(x, gen, box)
        return x

    return run


def lucent_transforms(scale: float = 8 / 224) -> list:
    """lucent's ``standard_transforms`` with pixel sizes scaled from its 224 px to the input:
    pad(12, constant) -> jitter(8) -> random_scale(0.90..1.10) -> random_rotate(-10..10 + 5x0)
    -> jitter(4); at 8 px: pad 1, jitter 2, ..., jitter 2."""
    size = max(1, round(12 * scale))
    return [
        pad(size, mode="constant"),
        jitter(max(2, round(8 * scale))),
        random_scale([1 + (i - 5) / 50 for i in range(11)]),
        random_rotate(list(range(-10, 11)) + 5 * [0]),
        jitter(max(2, round(4 * scale))),
    ]


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
        box = self.config.get("box")  # drawn on the input's scale: an all-white optimum shows white
        return image_grid_figure([img.mean(0) for img in self.images], titles, value_range=box)


def render(
    model: HookedModel,
    objective: Objective | str,
    *,
    param: str = "pixel",
    constraint: str = "box",
    radius: float | None = None,
    decorrelate: bool = False,
    transforms: Transforms | Sequence[Callable] | str | None = "standard",
    steps: int = 256,
    lr: float | None = None,
    seed: int = 0,
    batch: int | None = None,
    progress: bool = False,
    callback: Progress | None = None,
) -> FeatureVisualization:
    """Optimize a batch of inputs to maximize ``objective`` (Adam, as lucent's ``render_vis``).

    Args:
        model: an image model with a known ``input_shape`` (e.g. ``interp.load("zoo:digits-cnn")``).
        objective: see the module docstring, or a ``"layer:unit"`` string (``as_objective``); its
            unit count sets the batch size.
        param: ``"pixel"``, ``"fourier"`` (lucent's 1/f spectrum) or ``"cppn"`` (lucent's CPPN).
        constraint: ``"box"`` (the default: the input range ``model.input_range``, default [0, 1];
            clipped pixels for ``param="pixel"``, a sigmoid otherwise), ``"sigmoid"`` (a sigmoid
            onto the box for every param, lucent's ``to_valid_rgb``), ``"l2"`` (``||x|| <= radius``)
            or ``"none"``.
        decorrelate: optimize RGB images in lucent's decorrelated colour space (3 channels).
        transforms: ``"standard"`` (``Transforms()``), a ``Transforms``, a list of transforms
            applied in order (``[pad(1), jitter(2), random_scale(...), random_rotate(...)]``,
            lucent's, each called as ``t(x, gen, box)`` with the input range ``box``: constant
            padding is mid-grey of the box, lucent's 0.5 on [0, 1], and pixels vacated by jitter,
            scale or rotation its low end, lucent's 0; the result is centre-cropped, or padded with
            the grey, back to the input size), or None.
        steps, lr: Adam steps and learning rate (lucent: 512 and 0.05). ``lr=None``: 0.05, and
            0.005 for ``param="cppn"`` (lucent's CPPN notebook; at 0.05 its sigmoid saturates).
        seed: seeds the initialization and every transform draw (``torch.Generator``).
        batch: images when the objective does not fix it (e.g. a direction shared by all + diversity).
        progress: show a tqdm bar. ``callback(step, steps)`` is called after each step (e.g. to
            drive a UI progress bar).
    """
    from tqdm.auto import tqdm

    objective = as_objective(objective)
    _check_model(model)
    for check in objective.checks:
        check(model)
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    n = objective.batch or batch or 1
    bounds = tuple(model.input_range) if getattr(model, "input_range", None) else UNIT_BOX
    tf = _render_transforms(transforms, tuple(model.input_shape), bounds)
    gen = torch.Generator().manual_seed(seed)
    shape = (n, *model.input_shape)
    image = Param(shape, param, constraint, bounds, radius, gen, decorrelate=decorrelate).to(model.device)
    lr = (0.005 if param == "cppn" else 0.05) if lr is None else _check_lr(lr)
    opt = torch.optim.Adam(image.parameters(), lr=lr)
    with model.hooks(_readers(objective, store := {})):

        def loss() -> torch.Tensor:
            x = image()
            seen = tf(x, gen) if tf is not None else x
            return -objective(_run(model, objective, seen, x, store)).sum()

        bar = tqdm(range(steps), desc="feature vis", disable=not progress)
        history = _descend(loss, opt, bar, callback, after_step=image.project)
        with torch.no_grad():
            final = image()
            scores = _per_image(objective, _run(model, objective, final, final, store), n)
    config = {
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "param": param,
        "constraint": constraint,
        "box_map": "clip" if image.clipped else "sigmoid" if constraint in ("box", "sigmoid") else None,
        "box": list(bounds) if constraint in ("box", "sigmoid") else None,  # where the pixels lie
        "decorrelate": decorrelate,
        "radius": radius,
        "transforms": _describe_transforms(transforms, bounds),
        "batch": n,
        "optimizer": "Adam",
    }
    return FeatureVisualization(final.detach(), scores.detach(), objective.description, history, config)


def _render_transforms(transforms: Any, input_shape: tuple[int, ...], box: Box) -> Callable | None:
    """``render``'s transforms as one callable ``(x, gen) -> x`` at the input size, filling from the
    input range ``box`` (a ``Transforms`` pads with its low end), or None."""
    if transforms is None:
        return None
    if len(input_shape) != 3:
        raise InputError(
            f"transforms warp images, but the input shape is {input_shape}, not (C, H, W); "
            "pass transforms=None (the command line's --transforms none)"
        )
    if transforms == "standard":
        transforms = STANDARD
    if isinstance(transforms, Transforms):
        return lambda x, gen: transforms(x, gen, box[0])
    if isinstance(transforms, list | tuple) and all(callable(t) for t in transforms):
        steps = compose(transforms)
        size = input_shape[-2:]
        return lambda x, gen: fit(steps(x, gen, box), size, mid_grey(box))
    raise InputError(
        f"transforms must be 'standard', None, a Transforms or a list of transforms "
        f"(fv.pad, fv.jitter, fv.random_scale, fv.random_rotate), got {transforms!r}"
    )


def _describe_transforms(transforms: Any, box: Box) -> Any:
    """The transforms for ``config``: their settings, with the fill each used, so a run can be repeated."""
    if transforms is None:
        return None
    if transforms == "standard":
        transforms = STANDARD
    if isinstance(transforms, Transforms):
        return vars(transforms) | {"fill": box[0] if transforms.fill is None else transforms.fill}
    return [_describe_step(t, box) for t in transforms]


def _describe_step(step: Callable, box: Box) -> Any:
    """One transform of a list for ``config``: a constant ``Pad`` records the value it padded with,
    a jitter, scale or rotation the value its vacated pixels got."""
    if not hasattr(step, "__dict__"):
        return repr(step)
    settings = {"name": type(step).__name__, **vars(step)}
    if isinstance(step, Pad) and step.mode == "constant" and step.value is None:
        settings["value"] = mid_grey(box)
    if isinstance(step, Jitter | RandomScale | RandomRotate):
        settings["fill"] = box[0]
    return settings


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


@dataclass
class TokenVisualization:
    """Optimized input embeddings for transformer units, read out as their nearest tokens.

    Attributes:
        embeddings: ``[U, length, d_model]`` the optimized word embeddings (hook ``embed.hook_out``).
        tokens: ``[U, length]`` the nearest vocabulary token (L2) to each optimized embedding.
        str_tokens: the readout as token strings (ids as text without a tokenizer).
        scores: ``[U]`` the objective on the continuous embeddings.
        token_scores: ``[U]`` the objective on the readout tokens, run as ordinary input: the honest
            number (the continuous optimum is usually far above what any token sequence reaches).
        layer, units, config, history: what was optimized and how (seed, steps, lr, position...).
    """

    embeddings: torch.Tensor
    tokens: torch.Tensor
    str_tokens: list[list[str]]
    scores: torch.Tensor
    token_scores: torch.Tensor
    layer: str
    units: list[int]
    history: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


TOKEN_EMBED = "embed.hook_out"


def _descend(
    loss: Callable[[], torch.Tensor],
    opt: torch.optim.Optimizer,
    steps: Any,
    callback: Callable[[int, int], None] | None,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """One optimizer step on ``loss()`` per item of ``steps`` (a range, or a tqdm over one), then
    ``after_step()`` (e.g. a projection onto the box) and ``callback(step, n_steps)``. Returns the
    loss every 16 steps and at the last: the history ``render`` and ``render_tokens`` record."""
    n = len(steps)
    history: list[float] = []
    for step in steps:
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if after_step is not None:
            after_step()
        if step % 16 == 0 or step == n - 1:
            history.append(value.item())
        if callback is not None:
            callback(step + 1, n)
    return history


def render_tokens(
    model: HookedModel,
    layer: str,
    units: Units,
    *,
    length: int = 8,
    position: int | None = -1,
    steps: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    callback: Progress | None = None,
) -> TokenVisualization:
    """Feature visualization for transformer units: optimize the word embeddings of a
    ``length``-token input (Adam) to maximize unit ``units[b]`` of ``layer`` for sequence ``b``,
    then read each position out as its nearest vocabulary token — the option beside dataset
    examples (``interp.methods.examples.top_k``), which show real contexts instead.

    Args:
        model: a transformer whose word embedding is the hook ``embed.hook_out`` (an embedding table).
        layer: a hook ``[batch, pos, ...]``; its axes after ``pos`` are flattened into units (so a
            head hook ``[batch, pos, head, d_head]`` has ``head * d_head`` units).
        units: unit indices; one optimized sequence per unit.
        length: tokens per sequence.
        position: the position whose activation is maximized (default the last), None: the mean.
        steps, lr, seed: Adam steps, learning rate, and the seed of the starting tokens.
        callback: ``callback(step, steps)`` after each step (a UI progress bar).
    """
    table = _token_table(model)
    u = _units(units)
    if not isinstance(length, int) or length < 1:
        raise InputError(f"length must be a positive number of tokens, got {length!r}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if position is not None and not -length <= position < length:
        raise InputError(f"position {position} is out of range for {length} tokens")
    _check_lr(lr)
    (name,) = model.resolve(layer) if layer in model.hook_names else (layer,)
    if name not in model.hook_names:
        raise InputError(f"{model.name} has no hook {layer!r}; see model.hook_names")
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(table.shape[0], (len(u), length), generator=gen).to(table.device)
    dummy = torch.zeros_like(start)
    _check_token_units(model, name, u, start)
    score = _unit_score(name, u, position)
    embeds = torch.nn.Parameter(table[start].detach().clone())
    if not _depends_on(score(_token_acts(model, name, dummy, embeds)), embeds):
        raise InputError(
            f"{name} does not depend on the word embeddings (it carries token ids, or positions only), "
            f"so optimizing them cannot move it; pick a hook after {TOKEN_EMBED!r} (see model.hook_names)"
        )
    opt = torch.optim.Adam([embeds], lr=lr)
    history = _descend(
        lambda: -score(_token_acts(model, name, dummy, embeds)).sum(), opt, range(steps), callback
    )
    with torch.no_grad():
        final = embeds.detach()
        scores = score(_token_acts(model, name, dummy, final))
        tokens = torch.cdist(rearrange(final, "u p d -> (u p) d"), table).argmin(-1).view(len(u), length)
        token_scores = score(_token_acts(model, name, tokens, None))
    tok = getattr(model, "tokenizer", None)
    strs = [
        tok.convert_ids_to_tokens(row) if tok is not None else [str(int(i)) for i in row] for row in tokens
    ]
    config = {"seed": seed, "steps": steps, "lr": lr, "length": length, "position": position,
              "embedding": TOKEN_EMBED, "readout": "nearest token (L2)", "optimizer": "Adam"}  # fmt: skip
    return TokenVisualization(final, tokens, strs, scores, token_scores, name, u.tolist(), history, config)


def _depends_on(value: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether ``leaf`` is on ``value``'s autograd graph (a hook upstream of it, or beside it, is not)."""
    if not value.requires_grad:
        return False
    (grad,) = torch.autograd.grad(value.sum(), leaf, allow_unused=True)
    return grad is not None


def _check_lr(lr: Any) -> float:
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise InputError(f"lr must be a finite number > 0 (Adam's step size), got {lr!r}")
    return float(lr)


def _token_table(model: HookedModel) -> torch.Tensor:
    """The word-embedding table behind ``embed.hook_out`` (``[vocab, d_model]``): an
    ``nn.Embedding``'s weight, or a TransformerLens bridge's ``W_E``, checked on a probe to be what
    the hook carries (``table[ids]``), so the nearest-token readout reads the right table."""
    if model.kind != "transformer":
        raise InputError(
            f"render_tokens optimizes token embeddings; {model.name} is not a transformer, use render"
        )
    site = model._sites.get(TOKEN_EMBED)
    module = site.module if site is not None else None
    table = module.weight if isinstance(module, torch.nn.Embedding) else getattr(model.module, "W_E", None)
    if site is None or not isinstance(table, torch.Tensor) or table.ndim != 2:
        raise InputError(
            f"{model.name} has no word-embedding table at {TOKEN_EMBED!r}, so its embeddings cannot be "
            "read out as tokens; use dataset examples (interp.methods.examples.top_k)"
        )
    table = table.detach()
    probe = torch.arange(min(4, table.shape[0]), device=table.device).view(1, -1)
    with torch.no_grad():
        seen = _token_acts(model, TOKEN_EMBED, probe, None)
    if seen.shape != (1, probe.shape[1], table.shape[1]) or not torch.allclose(seen[0], table[probe[0]]):
        raise InputError(
            f"{TOKEN_EMBED!r} of {model.name} is not a plain lookup in its embedding table, so the "
            "nearest-token readout would not be faithful; use dataset examples (examples.top_k)"
        )
    return table


def _token_acts(
    model: HookedModel, layer: str, ids: torch.Tensor, embeds: torch.Tensor | None
) -> torch.Tensor:
    """``layer``'s activation on ``ids`` (word embeddings replaced by ``embeds`` when given)."""
    from interp.models.transformer import Tokens

    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any) -> None:
        store[layer] = act
        raise StopForward

    hooks = [] if embeds is None else [(TOKEN_EMBED, lambda act, hook: embeds)]
    with model.hooks([*hooks, (layer, keep)]), contextlib.suppress(StopForward):
        model._forward(Tokens(ids, torch.ones_like(ids)))
    return store[layer]


def _unit_score(
    layer: str, units: torch.Tensor, position: int | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    def score(act: torch.Tensor) -> torch.Tensor:
        flat = rearrange(act, "b p ... -> b p (...)")
        picked = flat[torch.arange(flat.shape[0]), :, units.to(flat.device)]  # [U, pos]
        return picked.mean(-1) if position is None else picked[:, position]

    return score


def _check_token_units(model: HookedModel, layer: str, units: torch.Tensor, ids: torch.Tensor) -> None:
    with torch.no_grad():
        act = _token_acts(model, layer, ids[:1], None)
    size = int(np.prod(act.shape[2:])) if act.ndim > 2 else 1
    _check_range(units, size, f"{layer} has {size} units per position")


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
            "use render_tokens (optimized embeddings read out as tokens) or dataset examples "
            "(interp.methods.examples.top_k) for transformer units"
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
    value_range: Sequence[float] | None = None,
) -> go.Figure:
    """2-D arrays as heatmaps in a grid (greys; ``diverging`` panels red-blue centred on 0).

    ``value_range=(low, high)`` pins the greys' scale (e.g. the input range): otherwise each panel
    spans its own values, and a constant panel, an all-white image say, is drawn mid-grey."""
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
            zmin=-bound if div else None if value_range is None else value_range[0],
            zmax=bound if div else None if value_range is None else value_range[1],
            showscale=div,
        )
        fig.add_trace(heat, row=i // cols + 1, col=i % cols + 1)
        # a frame, so an all-white image (a saturated optimum) still shows on a white page; a shape,
        # which streamlit's chart theme leaves alone (it restyles axis lines)
        fig.add_shape(type="rect", xref="x domain", yref="y domain", x0=0, y0=0, x1=1, y1=1,
                      line={"color": "#bbb", "width": 1}, row=i // cols + 1, col=i % cols + 1)  # fmt: skip
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, scaleanchor=None)
    fig.update_layout(height=max(220, 180 * rows), margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig
