"""Linear probes on activations: what a layer linearly encodes, checked against a control task.

A probe is a linear classifier (multinomial logistic regression) or regressor (ridge) fitted on the
activations of one hook point. A sweep fits one probe per hook point and reports held-out accuracy
(or R²) layer by layer. With ``control=True`` each sweep also fits the same probe to a *control
task* (Hewitt & Liang 2019): every input type (a token id, or by default each example) gets a random
label drawn from the real label distribution. A probe that can memorise a control task is expressive,
not informative; ``selectivity = accuracy - control accuracy`` is the part the representation earns.

    >>> from interp.methods import probing
    >>> x_tr, y_tr, x_te, y_te = zoo.digits_data()
    >>> sweep = probing.probe_sweep(model, x_tr, y_tr, names="*.hook_out", control=True)
    >>> sweep.accuracy, sweep.selectivity          # one value per hook point
    >>> sweep.figure().show()

Probe directions are interventions too: ``intervene(model, x, probe, mode="project_out")`` removes
the probe's subspace from the activation (mean-centred, so the mean activation is kept) and measures
the causal effect on the model's output, next to a random subspace of the same rank.

Classification probes are fitted in float64 with L-BFGS on exactly sklearn's objective
(``C * sum(cross-entropy) + ||W||² / 2``), so ``LogisticRegression(C=C)`` on the same features is the
reference they are tested against. Regression probes are closed-form ridge (``Ridge(alpha=1/C)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange

from interp.checks import require_finite
from interp.errors import InputError
from interp.models.base import HookedModel

MIN_PER_CLASS = 4  # a class needs a few examples on both sides of the train/test split
Position = int | str  # an index counted over real tokens (negative from the last), or "mean"


# ------------------------------------------------------------------------------------------------
# Features: activations flattened to one row per labelled item
# ------------------------------------------------------------------------------------------------


@dataclass
class Features:
    """Activations per hook name, one row per labelled item, with the labels and control types.

    Attributes:
        values: ``{hook name: [items, features]}`` float tensors.
        labels: ``[items]`` class ids, or ``[items]`` / ``[items, targets]`` regression targets.
        types: ``[items]`` type ids for the control task (token ids, or the item index).
        shapes: per hook name, the activation shape of one item before flattening.
    """

    values: dict[str, torch.Tensor]
    labels: torch.Tensor
    types: torch.Tensor
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def default_names(model: HookedModel) -> list[str]:
    """The hook points a sweep visits by default: the residual stream of a transformer (the
    embedding and every block's output) or the output of every leaf module of an ``nn.Module``."""
    names = model.hook_names
    if model.kind == "transformer":
        resid = [n for n in names if n.endswith("hook_resid_post")]
        embed = [n for n in ("hook_embed", "embed.hook_out") if n in names][:1]
        return embed + resid if resid else names
    leaves = {path for path, sub in model.module.named_modules() if path and not list(sub.children())}
    outs = [n for n in names if n.endswith(".hook_out") and n.removesuffix(".hook_out") in leaves]
    return outs or [n for n in names if n == "hook_out"]  # a module without submodules: its output


def collect_features(
    model: HookedModel,
    inputs: Any,
    labels: Any,
    names: str | Sequence[str] | None = None,
    *,
    position: Position = -1,
    types: Any = None,
    batch_size: int = 256,
) -> Features:
    """Capture the named activations and pair each labelled item with its feature row.

    Args:
        model: any ``HookedModel``.
        inputs: a tensor batch (modules), or texts / token ids (transformers).
        labels: ``[N]`` one label per input; for transformers also ``[N, pos]`` one label per token,
            with ``-1`` (classification) or NaN (regression) marking tokens without a label.
        names: hook names, globs or regexes; None = ``default_names(model)``.
        position: for per-input labels on a transformer, which token's activation to probe: an index
            over the real (unpadded) tokens, negative from the end, or ``"mean"`` over them.
        types: ``[N]`` (or ``[N, pos]``) type ids for the control task; default: token ids for
            per-token labels, else every item is its own type.
        batch_size: inputs per forward.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number >= 1 (inputs per forward), got {batch_size!r}")
    chosen = model.resolve(names) if names is not None else default_names(model)
    prepared = model.prepare(_listed(inputs))
    n = _count(prepared)
    y = torch.as_tensor(_listed(labels))
    if y.shape[0] != n:
        raise InputError(
            f"got {y.shape[0]} labels for {n} inputs; pass one label per input (or, for a transformer, "
            "one per token as an [inputs, pos] tensor)."
        )
    per_token = model.kind == "transformer" and y.ndim == 2 and y.shape[1] == prepared.input_ids.shape[1]
    if model.kind == "transformer" and not per_token and isinstance(position, int):
        lengths = _real_mask(prepared).sum(1)  # checked here, before any forward
        if (lengths + position < 0).any() if position < 0 else (position >= lengths).any():
            raise InputError(
                f"position {position} is outside some inputs (shortest has {lengths.min().item()} tokens)"
            )
    mask = _labelled_tokens(prepared, y) if per_token else None
    values: dict[str, list[torch.Tensor]] = {name: [] for name in chosen}
    shapes: dict[str, tuple[int, ...]] = {}
    for start in range(0, n, batch_size):
        batch = _slice(prepared, start, start + batch_size)
        _, cache = model.run_with_cache(batch, names=chosen, stop_early=True)
        for name in chosen:
            act = cache[name].float()
            feats, shapes[name] = _select(model, act, batch, position, per_token, mask, start)
            values[name].append(feats)
    labels_out = y[mask] if per_token else y
    types_out = _types(types, prepared, mask, per_token, n)
    return Features({k: torch.cat(v) for k, v in values.items()}, labels_out, types_out, shapes)


def _listed(values: Any) -> Any:
    """A ``datasets`` column (or any non-tensor sequence) as a list; tensors and strings unchanged."""
    if (
        values is None
        or isinstance(values, str | torch.Tensor | list | tuple | dict)
        or hasattr(values, "shape")
    ):
        return values
    return list(values)


def _count(prepared: Any) -> int:
    return prepared.input_ids.shape[0] if hasattr(prepared, "input_ids") else prepared.shape[0]


def _slice(prepared: Any, start: int, stop: int) -> Any:
    if not hasattr(prepared, "input_ids"):
        return prepared[start:stop]
    from interp.models.transformer import Tokens

    mask = prepared.attention_mask
    strs = prepared.str_tokens
    return Tokens(
        prepared.input_ids[start:stop],
        None if mask is None else mask[start:stop],
        None if strs is None else strs[start:stop],
    )


def _real_mask(prepared: Any) -> torch.Tensor:
    ids = prepared.input_ids
    mask = prepared.attention_mask
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool().to(ids.device)


def _labelled_tokens(prepared: Any, y: torch.Tensor) -> torch.Tensor:
    """``[N, pos]`` the real (unpadded) tokens that carry a label (not -1, not NaN)."""
    labelled = ~torch.isnan(y) if torch.is_floating_point(y) else y >= 0
    return _real_mask(prepared).cpu() & labelled


def _select(
    model: HookedModel,
    act: torch.Tensor,
    batch: Any,
    position: Position,
    per_token: bool,
    mask: torch.Tensor | None,
    start: int,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """One feature row per item from a batch's activation ``[b, ...]``."""
    if model.kind != "transformer":
        return rearrange(act, "b ... -> b (...)"), tuple(act.shape[1:])
    act = act if act.ndim == 3 else rearrange(act, "b p ... -> b p (...)")
    if per_token:
        return act[mask[start : start + act.shape[0]].to(act.device)].cpu(), (act.shape[-1],)
    real = _real_mask(batch)
    if position == "mean":
        weights = real.float()[..., None]
        return ((act * weights).sum(1) / weights.sum(1).clamp_min(1)).cpu(), (act.shape[-1],)
    if not isinstance(position, int):
        raise InputError(f"position must be an int or 'mean', got {position!r}")
    lengths = real.sum(1)
    index = lengths + position if position < 0 else torch.full_like(lengths, position)
    if (index < 0).any() or (index >= lengths).any():
        raise InputError(
            f"position {position} is outside some inputs (shortest has {lengths.min().item()} tokens)"
        )
    return act[torch.arange(act.shape[0]), index].cpu(), (act.shape[-1],)


def _types(types: Any, prepared: Any, mask: Any, per_token: bool, n: int) -> torch.Tensor:
    if types is not None:
        t = torch.as_tensor(_listed(types))
        if t.shape[0] != n:
            raise InputError(f"got {t.shape[0]} control types for {n} inputs; pass one type per input")
        return t[mask] if per_token and t.ndim == 2 else t
    if per_token:
        return prepared.input_ids.cpu()[mask]
    return torch.arange(n)


# ------------------------------------------------------------------------------------------------
# One probe
# ------------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """A fitted linear probe; ``weight``/``bias`` act on raw (unstandardised) features.

    Attributes:
        name: the hook point it reads.
        task: ``"classification"`` or ``"regression"``.
        weight: ``[classes or targets, features]``.
        bias: ``[classes or targets]``.
        mean: ``[features]`` the training features' mean (centre for projections).
        train_score, test_score: accuracy (classification) or R² (regression).
        classes: the class labels, in weight-row order (classification).
        config: C, standardize, seed, split sizes.
    """

    name: str
    task: str
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    train_score: float
    test_score: float
    classes: torch.Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Class labels (classification) or predicted targets (regression) for ``[items, features]``."""
        features = torch.as_tensor(features)
        if features.ndim != 2 or features.shape[1] != self.weight.shape[1]:
            raise InputError(
                f"the probe reads [items, {self.weight.shape[1]}] features, got shape {tuple(features.shape)}"
            )
        require_finite(features, "the features to score", "Drop or impute the rows with NaN/inf.")
        out = features.double() @ self.weight.T + self.bias
        if self.task == "classification":
            return self.classes[out.argmax(-1)]
        return out.squeeze(-1) if self.weight.shape[0] == 1 else out

    def score(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Accuracy or R² of the probe on new features."""
        if len(labels) != len(features):
            raise InputError(f"got {len(labels)} labels for {len(features)} feature rows; pass one per row")
        pred = self.predict(features)
        if self.task == "classification":
            return (pred == labels.to(pred.device)).double().mean().item()
        return r2_score(pred, labels)

    def directions(self) -> torch.Tensor:
        """An orthonormal basis ``[features, k]`` of the probe's weight rows (its readout subspace).

        For K classes the rows span K-1 dimensions that matter (softmax is shift invariant), so the
        rows are centred across classes first.
        """
        w = self.weight
        if self.task == "classification" and w.shape[0] > 1:
            w = w - w.mean(0, keepdim=True)
            w = w[: max(1, w.shape[0] - 1)] if w.shape[0] > 2 else w[:1]
        q, _ = torch.linalg.qr(w.T)
        return q

    def direction(self, cls: Any = None) -> torch.Tensor:
        """The unit vector of one class's weight row (minus the mean row), or of a regression target."""
        w = self.weight
        if self.task == "classification":
            hits = [] if cls is None else (self.classes == int(cls)).nonzero().flatten().tolist()
            if cls is not None and not hits:
                raise InputError(f"class {cls!r} is not one of the probe's classes {self.classes.tolist()}")
            index = 0 if cls is None else hits[0]
            w = w - w.mean(0, keepdim=True)
            row = w[index]
        else:
            if cls is not None and not 0 <= int(cls) < w.shape[0]:
                raise InputError(f"target {cls!r} is outside the probe's {w.shape[0]} regression target(s)")
            row = w[0 if cls is None else int(cls)]
        return row / row.norm().clamp_min(1e-12)


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination, averaged uniformly over targets (as sklearn's ``r2_score``)."""
    pred, target = pred.double().reshape(len(pred), -1), target.double().reshape(len(target), -1)
    ss_res = ((target - pred) ** 2).sum(0)
    ss_tot = ((target - target.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return (1 - ss_res / ss_tot).mean().item()


def split(
    labels: torch.Tensor, task: str, test_size: float = 0.25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/test indices; stratified by class for classification.

    Raises InputError when a class has fewer than ``MIN_PER_CLASS`` examples (it could not appear in
    both halves and its accuracy would be noise).
    """
    if not 0 < test_size < 1:
        raise InputError(f"test_size must lie strictly between 0 and 1, got {test_size}")
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    if task != "classification":
        perm = torch.randperm(n, generator=gen)
        cut = max(1, round(n * test_size))
        return perm[cut:], perm[:cut]
    check_class_counts(labels)
    train, test = [], []
    for cls in labels.unique():
        idx = (labels == cls).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = max(1, round(len(idx) * test_size))
        test.append(idx[:cut])
        train.append(idx[cut:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def check_class_counts(labels: torch.Tensor, minimum: int = MIN_PER_CLASS) -> None:
    """InputError naming every class with fewer than ``minimum`` examples."""
    classes, counts = labels.unique(return_counts=True)
    if len(classes) < 2:
        raise InputError(
            f"a classification probe needs at least 2 classes, got only {classes.tolist()}; check the labels."
        )
    few = [(c, k) for c, k in zip(classes.tolist(), counts.tolist(), strict=True) if k < minimum]
    if few:
        listed = ", ".join(f"class {c}: {k} example{'s' if k != 1 else ''}" for c, k in few)
        raise InputError(
            f"too few examples to probe ({listed}); every class needs at least {minimum} so it appears in "
            "both the train and test split. Add examples, merge rare classes or drop them."
        )


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    task: str = "classification",
    C: float = 1.0,
    standardize: bool = True,
    train_idx: torch.Tensor | None = None,
    test_idx: torch.Tensor | None = None,
    test_size: float = 0.25,
    seed: int = 0,
    name: str = "",
    max_iter: int = 100,
) -> Probe:
    """Fit one linear probe on ``[items, features]`` and score it on a held-out split.

    Args:
        task: ``"classification"`` (multinomial logistic regression) or ``"regression"`` (ridge).
        C: inverse regularisation strength as in sklearn: ``LogisticRegression(C=C)``,
            ``Ridge(alpha=1/C)``; ``math.inf`` fits without regularisation.
        standardize: scale features to unit variance (train statistics) before fitting, so one C
            suits every layer; the returned weights are mapped back to raw features.
        train_idx, test_idx: an explicit split (default: seeded, stratified ``split``).
    """
    _check_task(task)
    if not isinstance(C, int | float) or isinstance(C, bool) or math.isnan(C) or C <= 0:
        raise InputError(f"C must be positive (math.inf for no regularisation), got {C!r}")
    x, y = _probe_data(features, labels, task)
    if train_idx is None or test_idx is None:
        train_idx, test_idx = split(y, task, test_size, seed)
    else:
        train_idx, test_idx = _indices(train_idx, len(y), "train_idx"), _indices(test_idx, len(y), "test_idx")
        if task == "classification":
            check_class_counts(y[train_idx], minimum=1)
    mean = x[train_idx].mean(0)
    scale = x[train_idx].std(0).clamp_min(1e-8) if standardize else torch.ones_like(mean)
    xs = (x - mean) / scale
    if task == "classification":
        classes, y_idx = y[train_idx].unique(return_inverse=True)
        w, b = _logistic(xs[train_idx], y_idx, len(classes), C, max_iter)
    else:
        classes = None
        w, b = _ridge(xs[train_idx], y[train_idx].double().reshape(len(train_idx), -1), C)
    weight = w / scale  # back to raw features: w·(x - m)/s + b = (w/s)·x + (b - (w/s)·m)
    bias = b - weight @ mean
    probe = Probe(name, task, weight, bias, mean, math.nan, math.nan, classes, {})
    probe.train_score = probe.score(x[train_idx], y[train_idx])
    probe.test_score = probe.score(x[test_idx], y[test_idx])
    probe.config = {
        "C": C,
        "standardize": standardize,
        "seed": seed,
        "n_train": len(train_idx),
        "n_test": len(test_idx),
    }
    return probe


def _probe_data(features: Any, labels: Any, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[items, features]`` float64 and ``[items]`` labels, refused when a probe on them would be
    meaningless: no rows, NaN/inf features (chance scores without a word), mismatched lengths."""
    try:
        x, y = torch.as_tensor(features), torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise InputError("features and labels must be tensors (or arrays) of numbers") from None
    if x.ndim == 0 or len(x) == 0 or x[0].numel() == 0:
        raise InputError(
            f"no data to probe: features have shape {tuple(x.shape)}; pass [items, features] with at least "
            f"{2 * MIN_PER_CLASS} rows"
        )
    if x.is_complex() or y.is_complex():
        raise InputError("features and labels must be real numbers, not complex")
    x = x.double().reshape(len(x), -1)
    require_finite(x, "the probe features", "Drop or impute the rows with NaN/inf before probing.")
    if y.ndim == 0 or len(x) != len(y):
        raise InputError(f"got {y.numel()} labels for {len(x)} feature rows; pass one label per row")
    if task == "regression":
        require_finite(y.double(), "the regression targets", "Drop the rows whose target is NaN/inf.")
    elif y.is_floating_point() and not bool((y == y.round()).all()):
        raise InputError(
            "classification labels must be class ids (integers), got fractional or NaN values; "
            "use task='regression' for continuous targets"
        )
    return x, y


def _indices(idx: Any, n: int, what: str) -> torch.Tensor:
    """An explicit split: a non-empty LongTensor of row indices in [0, n)."""
    t = torch.as_tensor(idx)
    if t.dtype == torch.bool:
        t = t.nonzero().flatten()
    if t.is_floating_point() or t.numel() == 0:
        raise InputError(f"{what} must be a non-empty list of row indices (integers), got {t.numel()} values")
    t = t.long().reshape(-1)
    if int(t.min()) < -n or int(t.max()) >= n:
        raise InputError(f"{what} holds row indices outside [0, {n}) (there are {n} feature rows)")
    return t


def _check_task(task: str) -> None:
    if task not in ("classification", "regression"):
        raise InputError(f"task must be 'classification' or 'regression', got {task!r}")


def _logistic(
    x: torch.Tensor, y: torch.Tensor, k: int, C: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression minimising ``C * sum CE + ||W||²/2`` (sklearn's objective)."""
    w = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    penalty = 0.0 if math.isinf(C) else 0.5 / C
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-9, tolerance_change=1e-12,
    )  # fmt: skip
    n = len(y)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # divide the sklearn objective by C * n: same minimiser, better-scaled numbers for L-BFGS
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + penalty * (w * w).sum() / n
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _ridge(x: torch.Tensor, y: torch.Tensor, C: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge with an unpenalised intercept: centre, solve ``(XᵀX + I/C) W = XᵀY``."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    alpha = 0.0 if math.isinf(C) else 1.0 / C
    gram = xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.lstsq(gram, xc.T @ yc).solution.T  # lstsq: fine when unregularised and singular
    return w, ym - w @ xm


def control_labels(labels: torch.Tensor, types: torch.Tensor, task: str, seed: int = 0) -> torch.Tensor:
    """Hewitt & Liang's control task: each type gets one label drawn from the empirical label
    distribution (for regression: one target row drawn from the observed targets)."""
    gen = torch.Generator().manual_seed(seed + 1)
    uniq, inverse = types.unique(return_inverse=True)
    draw = torch.randint(len(labels), (len(uniq),), generator=gen)
    control = labels[draw][inverse]
    if task == "classification":  # keep every class populated enough to split
        classes, counts = control.unique(return_counts=True)
        if len(classes) < 2 or counts.min() < MIN_PER_CLASS:
            perm = torch.randperm(len(labels), generator=gen)
            control = labels[perm]
    return control


# ------------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------------


@dataclass
class ProbeSweep:
    """One probe per hook point, with its control task.

    Attributes:
        names: hook points in forward order.
        accuracy: ``[layers]`` held-out accuracy (R² for regression).
        train_accuracy: ``[layers]`` accuracy on the training split.
        control_accuracy: ``[layers]`` held-out accuracy on the control task (NaN if ``control=False``).
        selectivity: ``accuracy - control_accuracy``.
        chance: accuracy of always predicting the most frequent training class (0 for R²).
        probes: the fitted probes by name.
        task, config: what was fitted and how (C, seed, split, position).
    """

    names: list[str]
    accuracy: torch.Tensor
    train_accuracy: torch.Tensor
    control_accuracy: torch.Tensor
    chance: float
    probes: dict[str, Probe]
    task: str
    config: dict[str, Any]
    control_probes: dict[str, Probe] = field(default_factory=dict)

    @property
    def selectivity(self) -> torch.Tensor:
        return self.accuracy - self.control_accuracy

    @property
    def best(self) -> str:
        """The hook point whose probe scores highest on held-out data."""
        return self.names[int(self.accuracy.argmax())]

    def figure(self, title: str | None = None):
        """Held-out accuracy, control accuracy and selectivity per hook point (plotly)."""
        import plotly.graph_objects as go

        metric = "accuracy" if self.task == "classification" else "R²"
        fig = go.Figure()
        fig.add_scatter(x=self.names, y=self.accuracy.tolist(), mode="lines+markers", name=f"probe {metric}")
        fig.add_scatter(x=self.names, y=self.train_accuracy.tolist(), mode="lines", name=f"train {metric}",
                        line={"dash": "dot"})  # fmt: skip
        if not torch.isnan(self.control_accuracy).all():
            fig.add_scatter(x=self.names, y=self.control_accuracy.tolist(), mode="lines+markers",
                            name=f"control task {metric}")  # fmt: skip
            fig.add_scatter(x=self.names, y=self.selectivity.tolist(), mode="lines", name="selectivity",
                            line={"dash": "dash"})  # fmt: skip
        if self.task == "classification":
            fig.add_hline(y=self.chance, line_dash="dot", annotation_text="majority class")
        fig.update_layout(title=title or f"Linear probe {metric} per hook point", xaxis_title="hook point",
                          yaxis_title=metric, height=420)  # fmt: skip
        return fig


def sweep_features(
    features: Features,
    *,
    task: str = "classification",
    control: bool = True,
    C: float = 1.0,
    standardize: bool = True,
    test_size: float = 0.25,
    seed: int = 0,
) -> ProbeSweep:
    """Fit a probe (and a control probe) per hook point on already collected ``Features``."""
    _check_task(task)
    y = features.labels
    train_idx, test_idx = split(y, task, test_size, seed)
    kw = {
        "task": task,
        "C": C,
        "standardize": standardize,
        "train_idx": train_idx,
        "test_idx": test_idx,
        "seed": seed,
    }
    ctrl_y = control_labels(y, features.types, task, seed) if control else None
    if ctrl_y is not None and task == "classification":
        ctrl_split = split(ctrl_y, task, test_size, seed)
    probes, controls = {}, {}
    for name, x in features.values.items():
        probes[name] = fit_probe(x, y, name=name, **kw)
        if ctrl_y is not None:
            ckw = (
                {**kw, "train_idx": ctrl_split[0], "test_idx": ctrl_split[1]}
                if task == "classification"
                else kw
            )
            controls[name] = fit_probe(x, ctrl_y, name=name, **ckw)
    names = list(features.values)
    nan = torch.full((len(names),), math.nan, dtype=torch.float64)
    chance = 0.0
    if task == "classification":
        chance = (y[test_idx] == y[train_idx].mode().values).double().mean().item()
    return ProbeSweep(
        names=names,
        accuracy=torch.tensor([probes[n].test_score for n in names], dtype=torch.float64),
        train_accuracy=torch.tensor([probes[n].train_score for n in names], dtype=torch.float64),
        control_accuracy=torch.tensor([controls[n].test_score for n in names], dtype=torch.float64)
        if control
        else nan,
        chance=chance,
        probes=probes,
        task=task,
        config={
            "C": C,
            "standardize": standardize,
            "test_size": test_size,
            "seed": seed,
            "control": control,
            "n_items": len(y),
            "n_train": len(train_idx),
            "n_test": len(test_idx),
        },  # fmt: skip
        control_probes=controls,
    )


def probe_sweep(
    model: HookedModel,
    inputs: Any,
    labels: Any,
    names: str | Sequence[str] | None = None,
    *,
    task: str = "classification",
    control: bool = True,
    C: float = 1.0,
    standardize: bool = True,
    position: Position = -1,
    types: Any = None,
    test_size: float = 0.25,
    seed: int = 0,
    batch_size: int = 256,
) -> ProbeSweep:
    """Probe every named hook point of ``model`` for ``labels``; see :func:`collect_features` for the
    inputs, labels, position and types, and :func:`fit_probe` for C and standardize."""
    _check_task(task)
    feats = collect_features(
        model, inputs, labels, names, position=position, types=types, batch_size=batch_size
    )
    sweep = sweep_features(feats, task=task, control=control, C=C, standardize=standardize,
                           test_size=test_size, seed=seed)  # fmt: skip
    sweep.config.update({"model": model.name, "position": position})
    return sweep


# ------------------------------------------------------------------------------------------------
# Probe directions as interventions
# ------------------------------------------------------------------------------------------------


def _edit_fn(
    basis: torch.Tensor, centre: torch.Tensor, mode: str, scale: float
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """A replacement hook applying a projection or an addition on the flattened activation (or on its
    last axis, when the probe read one position's vector)."""
    if mode not in ("project_out", "add"):
        raise InputError(f"mode must be 'project_out' or 'add', got {mode!r}")
    dim = basis.shape[0]

    def edit(act: torch.Tensor, hook: Any) -> torch.Tensor:
        flat = act[0].numel() == dim
        x = rearrange(act, "b ... -> b (...)") if flat else act
        if x.shape[-1] != dim:
            raise InputError(
                f"the probe has {dim} features but the activation at {hook.name} is {tuple(act.shape)}"
            )
        u = basis.to(x.dtype).to(x.device)
        if mode == "project_out":
            c = centre.to(x.dtype).to(x.device)
            x = x - ((x - c) @ u) @ u.T
        else:
            x = x + scale * u[:, 0]
        return x.reshape(act.shape)

    return edit


@dataclass
class Intervention:
    """The causal effect of editing a hook point along probe directions.

    Attributes:
        name: the hook point edited.
        mode: ``"project_out"`` or ``"add"``.
        metric_clean: the metric without the edit.
        metric_edited: the metric with the probe directions edited.
        metric_random: the metric with a random subspace of the same rank edited (the control).
        rank: how many directions were edited.
        config: scale, seed, class.
    """

    name: str
    mode: str
    metric_clean: float
    metric_edited: float
    metric_random: float
    rank: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def effect(self) -> float:
        """Change in the metric caused by the probe edit."""
        return self.metric_edited - self.metric_clean

    @property
    def random_effect(self) -> float:
        return self.metric_random - self.metric_clean

    def figure(self):
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=["clean", "probe edit", "random edit"],
                               y=[self.metric_clean, self.metric_edited, self.metric_random]))  # fmt: skip
        fig.update_layout(
            title=f"{self.mode} at {self.name} (rank {self.rank})", yaxis_title="metric", height=360
        )
        return fig


def accuracy_metric(labels: Any) -> Callable[[torch.Tensor], float]:
    """``metric(logits) -> accuracy`` of the model's own argmax against ``labels``."""
    y = torch.as_tensor(labels).reshape(-1)

    def accuracy(out: torch.Tensor) -> float:
        if out.ndim != 2 or out.shape[0] != len(y):
            raise InputError(
                f"accuracy needs logits [inputs, classes] with one label per input; got output shape "
                f"{tuple(out.shape)} for {len(y)} labels. Pass metric=fn(output) -> float for other outputs."
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= out.shape[-1]):
            raise InputError(
                f"labels must be classes in [0, {out.shape[-1]}) (the model outputs {out.shape[-1]} logits), "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )
        return (out.argmax(-1).cpu() == y).double().mean().item()

    return accuracy


def intervene(
    model: HookedModel,
    inputs: Any,
    probe: Probe,
    *,
    mode: str = "project_out",
    metric: Callable[[torch.Tensor], float] | None = None,
    labels: Any = None,
    cls: Any = None,
    scale: float = 1.0,
    seed: int = 0,
) -> Intervention:
    """Edit ``probe.name`` along the probe's directions and measure the effect on the output.

    ``project_out`` removes the whole readout subspace (mean-centred); ``add`` adds ``scale`` times
    the unit direction of class ``cls``. The same edit along random orthonormal directions of the
    same rank is the control: an effect well beyond it is specific to what the probe found.
    The metric defaults to the model's accuracy on ``labels``.
    """
    if metric is None:
        if labels is None:
            raise InputError("pass labels (to measure the model's accuracy) or a metric(output) -> float")
        metric = accuracy_metric(labels)
    basis = probe.directions().float() if mode == "project_out" else probe.direction(cls).float()[:, None]
    gen = torch.Generator().manual_seed(seed)
    rand, _ = torch.linalg.qr(torch.randn(basis.shape[0], basis.shape[1], generator=gen, dtype=torch.float64))
    centre = probe.mean.float()
    clean = metric(model(inputs))
    edited = metric(model.run_with_hooks(inputs, [(probe.name, _edit_fn(basis, centre, mode, scale))]))
    random = metric(model.run_with_hooks(inputs, [(probe.name, _edit_fn(rand.float(), centre, mode, scale))]))
    return Intervention(probe.name, mode, clean, edited, random, basis.shape[1],
                        {"scale": scale, "seed": seed, "cls": cls})  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Property datasets for the zoo models and MiniLM
# ------------------------------------------------------------------------------------------------


def repeat_labels(tokens: torch.Tensor, ignore_first: int = 1) -> torch.Tensor:
    """Per token: 1 if the same token occurred earlier in the sequence, else 0; ``-1`` for the first
    ``ignore_first`` positions (BOS). The induction-2l property "is this token a repeat?"."""
    same = tokens[:, :, None] == tokens[:, None, :]
    earlier = torch.tril(same, diagonal=-1)
    earlier[:, :, :ignore_first] = False
    labels = earlier.any(-1).long()
    labels[:, :ignore_first] = -1
    return labels


def copied_span_tokens(
    batch: int, vocab: int = 64, base_len: int = 30, span: int = 10, seed: int = 0
) -> torch.Tensor:
    """``[batch, 1 + base_len + span]`` token ids (BOS = ``vocab``) whose only repeats are one copied span.

    ``base_len`` distinct tokens, then a copy of ``span`` of them inserted at a random later point. On
    ``[BOS, r, r]`` "is this a repeat?" is the same as "is this in the second half", so a probe can
    read it from position alone; here the repeats sit at a different offset in every sequence.
    """
    if base_len > vocab or not 0 < span < base_len:
        raise InputError(
            f"need 0 < span < base_len <= vocab, got span={span}, base_len={base_len}, vocab={vocab}"
        )
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        base = torch.randperm(vocab, generator=gen)[:base_len]
        start = int(torch.randint(0, base_len - span, (1,), generator=gen))
        insert = int(torch.randint(start + span, base_len + 1, (1,), generator=gen))
        seq = torch.cat([base[:insert], base[start : start + span], base[insert:]])
        rows.append(torch.cat([torch.tensor([vocab]), seq]))
    return torch.stack(rows)


def fourier_targets(tokens: torch.Tensor, p: int, k: int) -> torch.Tensor:
    """``[N, 2]``: cos and sin of ``2πk(a + b)/p`` for modular-addition inputs ``(a, b, =)``."""
    angle = 2 * math.pi * k * (tokens[:, 0] + tokens[:, 1]).double() / p
    return torch.stack([angle.cos(), angle.sin()], dim=1)


def key_frequency(model: HookedModel, p: int) -> int:
    """The frequency k in 1..(p-1)/2 whose cos/sin components of the token embedding are largest
    (Nanda et al. 2023: the embedding is sparse in the Fourier basis)."""
    w_e = _embedding_matrix(model)[:p].double()
    a = torch.arange(p, dtype=torch.float64)
    norms = []
    for k in range(1, (p - 1) // 2 + 1):
        basis = torch.stack([torch.cos(2 * math.pi * k * a / p), torch.sin(2 * math.pi * k * a / p)])
        norms.append((basis @ w_e).norm().item())
    return 1 + int(torch.tensor(norms).argmax())


def _embedding_matrix(model: HookedModel) -> torch.Tensor:
    for name, param in model.module.named_parameters():
        plain = name.replace("._original_component", "")  # TransformerBridge wraps every module
        if plain.endswith(("embed.W_E", "tok_embed.weight", "embed.weight", "W_E")):
            return param.detach()
    raise InputError(f"could not find the token embedding matrix of {model.name}")


SINGULAR = ["cat", "dog", "teacher", "doctor", "girl", "boy", "farmer", "bird", "student", "writer",
            "king", "child", "woman", "man", "horse", "friend"]  # fmt: skip
PLURAL = ["cats", "dogs", "teachers", "doctors", "girls", "boys", "farmers", "birds", "students", "writers",
          "kings", "children", "women", "men", "horses", "friends"]  # fmt: skip
_VERBS = ["saw", "liked", "found", "watched", "visited", "painted", "remembered", "followed"]
_OBJECTS = ["house", "river", "garden", "old car", "small boat", "market", "bridge", "tower", "forest"]
_ADJECTIVES = ["old", "young", "happy", "tall", "quiet", "clever"]


def subject_number_dataset(n: int = 400, seed: int = 0):
    """A templated ``datasets.Dataset`` for "is the subject plural?": ``The [adj] NOUN VERB the OBJECT.``

    Columns: ``text``, ``label`` (1 = plural subject), ``noun`` (the lemma index, the control type:
    every lemma appears in both numbers, so the label is not a function of the lemma). The verbs are
    past tense, so no word after the subject agrees with it: a probe at the final token must read
    the number from context.
    """
    import datasets

    gen = torch.Generator().manual_seed(seed)

    def pick(options: Sequence[str]) -> str:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    rows: dict[str, list] = {"text": [], "label": [], "noun": []}
    for i in range(n):
        lemma = int(torch.randint(len(SINGULAR), (1,), generator=gen))
        plural = i % 2
        noun = (PLURAL if plural else SINGULAR)[lemma]
        adj = pick(_ADJECTIVES) + " " if torch.rand(1, generator=gen).item() < 0.5 else ""
        rows["text"].append(f"The {adj}{noun} {pick(_VERBS)} the {pick(_OBJECTS)}.")
        rows["label"].append(plural)
        rows["noun"].append(lemma)
    return datasets.Dataset.from_dict(rows)
