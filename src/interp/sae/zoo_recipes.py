"""Zoo dictionaries: small SAEs and transcoders trained here, shipped in SAELens's format.

Each dictionary is a :class:`DictionaryRecipe` (the model and hook it reads, the data, every
``S.train`` option including the seed) and a directory ``src/interp/sae/zoo/NAME`` that
``S.load("zoo:NAME")`` reads: ``cfg.json`` + ``sae_weights.safetensors`` + the sha256 sidecar
``S.save`` writes. ``cfg.json``'s ``metadata.training`` holds what ``S.train`` records (config,
seed, steps, data) and ``metadata.zoo`` the recipe's name, the data's description (corpus, size,
hash) and the evaluations (``S.evaluate`` on the held-out data, SAELens's key names).

    >>> from interp.sae import zoo_recipes as Z
    >>> Z.DICTIONARY_NAMES                       # minilm-l3-resid-topk, tms-20-5-hidden, ...
    >>> sae = S.load("zoo:minilm-l3-resid-topk")
    >>> S.evaluate(Z.source_model(name), sae, Z.eval_inputs(name))   # reproduces metadata.zoo.metrics
    >>> Z.train_dictionary(name)                 # retrain from the recipe (`interp zoo train NAME`)

The dictionaries:

- ``minilm-l3-resid-topk``: TopK SAE (d_sae 1536 = 4 x 384, k 32) on MiniLM's
  ``blocks.3.hook_resid_post`` (after 4 of its 6 layers), trained on Python's own documentation
  (:func:`pydoc_corpus`: the text of ``pydoc_data.topics``, which every CPython install ships, so no
  hub is needed). The corpus is cut into chunks of <= 128 tokens along line breaks; every tenth chunk
  is held out for evaluation.
- ``tms-20-5-hidden``: standard (ReLU + L1) SAE with 20 latents (one per input feature) on the 5-d hidden layer of
  ``zoo:tms-20-5``'s instance 4 (feature probability 0.01, 12 of its 20 features represented, in
  superposition), trained on the model's own input distribution. ``source_model`` gives that instance
  as a one-instance model, so splicing and ``S.evaluate`` see exactly what it was trained on.
- ``modadd-113-mlp0-transcoder``: transcoder (d_sae 1024, L1 5) from ``blocks.0.mlp.hook_in`` to
  ``blocks.0.hook_mlp_out`` of ``zoo:modadd-113``, trained on every ``(a, b, =)`` input (all
  positions) and evaluated on all of them. The model answers at the last position only, so instead of
  SAELens's next-token CE score ``metadata.zoo.task_metrics`` holds the same score on the task
  (:func:`modadd_task_metrics`). The MLP's output is dense in any basis this small (Fourier features
  of a and b): at EV 0.977 the transcoder uses 137 latents per token, 44% of them dense (> 10%).

Recorded (``metadata.zoo.metrics``, held-out data): minilm EV 0.862, L0 32, dead 0; tms EV 0.917,
L0 0.83 (cossim 0.60: on samples where only unrepresented features are on, h is tiny and the SAE
rightly outputs ~0); modadd EV 0.977, L0 137, task loss score 0.997, accuracy 0.9998 spliced.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from interp.errors import InputError, closest

ZOO_DIR = Path(__file__).resolve().parent / "zoo"


@dataclass(frozen=True)
class DictionaryRecipe:
    """One zoo dictionary: what it reads, what it is trained on, and every training option.

    ``train_data(model, fast)`` returns the training data (anything ``S.train`` accepts) and a
    JSON-ready description of it; ``eval_data(model)`` the held-out inputs ``S.evaluate`` reads.
    ``options`` go to ``S.train`` unchanged (``fast_overrides`` on top for the tests' quick variant).
    """

    name: str
    description: str
    model: str
    hook: str
    options: Mapping[str, Any]
    train_data: Callable[[Any, bool], tuple[Any, dict[str, Any]]]
    eval_data: Callable[[Any], Any]
    fast_overrides: Mapping[str, Any] = field(default_factory=dict)
    eval_options: Mapping[str, Any] = field(default_factory=dict)
    task_metrics: Callable[[Any, Any], dict[str, float]] | None = None

    def resolved_options(self, fast: bool = False) -> dict[str, Any]:
        return {**self.options, **(self.fast_overrides if fast else {})}


# ------------------------------------------------------------------------------------------------
# Corpus: Python's documentation topics (real English, in every CPython install)
# ------------------------------------------------------------------------------------------------

CHUNK_TOKENS = 128  # tokens per chunk, [CLS] and [SEP] included
HOLDOUT_EVERY = 10  # every tenth chunk is held out for evaluation


def pydoc_corpus() -> tuple[str, dict[str, Any]]:
    """The text of ``pydoc_data.topics`` (topics in sorted order, blank-line separated) and its record.

    The record names the source, the Python version it came from, its size and its sha256. Another
    CPython release ships other docs: a retrain records the hash it saw, so compare it with the
    shipped dictionary's ``metadata.zoo.data.sha256`` before comparing metrics.
    """
    import platform
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[key].strip() for key in sorted(topics.topics))
    return text, {
        "corpus": "pydoc_data.topics (CPython's bundled documentation topics)",
        "python": platform.python_version(),
        "topics": len(topics.topics),
        "characters": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }


def text_chunks(tokenizer: Any, text: str, max_tokens: int = CHUNK_TOKENS) -> list[str]:
    """``text`` cut along line breaks into chunks of at most ``max_tokens`` tokens (specials included).

    Lines are packed greedily; a line too long on its own is cut at word boundaries. Chunks stay
    readable strings (dashboards show them), and each tokenizes to at most ``max_tokens``.
    """
    budget = max_tokens - 2  # [CLS] ... [SEP]
    chunks: list[str] = []
    current: list[str] = []
    used = 0
    for line in _pieces(tokenizer, text, budget):
        n = len(tokenizer.tokenize(line))
        if current and used + n > budget:
            chunks.append("\n".join(current))
            current, used = [], 0
        current.append(line)
        used += n
    if current:
        chunks.append("\n".join(current))
    return chunks


def _pieces(tokenizer: Any, text: str, budget: int) -> list[str]:
    out: list[str] = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line.strip():
            continue
        if len(tokenizer.tokenize(line)) <= budget:
            out.append(line)
            continue
        words, piece = line.split(" "), ""
        for word in words:
            trial = f"{piece} {word}" if piece else word
            if piece and len(tokenizer.tokenize(trial)) > budget:
                out.append(piece)
                trial = word
            piece = trial
        if piece:
            out.append(piece[: budget * 2])  # a single word longer than the budget (never in the docs)
    return out


def pydoc_split(tokenizer: Any) -> tuple[list[str], list[str], dict[str, Any]]:
    """Train and held-out chunks of :func:`pydoc_corpus`, and the corpus record with token counts."""
    text, record = pydoc_corpus()
    chunks = text_chunks(tokenizer, text)
    held = [c for i, c in enumerate(chunks) if i % HOLDOUT_EVERY == 0]
    train = [c for i, c in enumerate(chunks) if i % HOLDOUT_EVERY != 0]
    count = lambda part: sum(len(tokenizer.tokenize(c)) + 2 for c in part)  # noqa: E731
    record = {
        **record,
        "chunking": f"lines packed into <= {CHUNK_TOKENS} tokens; every {HOLDOUT_EVERY}th chunk held out",
        "chunks": len(chunks),
        "train_tokens": count(train),
        "eval_tokens": count(held),
    }
    record["tokens"] = record["train_tokens"] + record["eval_tokens"]
    return train, held, record


def capture_activations(model: Any, texts: list[str], hooks: list[str], batch_size: int = 16) -> tuple:
    """Activations at ``hooks`` over every real token of ``texts`` (one forward per batch, stopped early)."""
    from interp.sae.evaluation import _batches, _mask

    parts: list[list[torch.Tensor]] = [[] for _ in hooks]
    with torch.no_grad():
        for batch in _batches(model, texts, batch_size):
            _, cache = model.run_with_cache(batch, names=hooks, stop_early=True)
            mask = _mask(cache, cache[hooks[0]])
            for store, hook in zip(parts, hooks, strict=True):
                store.append(cache[hook][mask].reshape(-1, cache[hook].shape[-1]).float())
    return tuple(torch.cat(p) for p in parts)


def _minilm_train(model: Any, fast: bool) -> tuple[Any, dict[str, Any]]:
    train, _, record = pydoc_split(model.tokenizer)
    if fast:
        train = train[:40]
        record = {**record, "fast": "first 40 training chunks"}
    (acts,) = capture_activations(model, train, ["blocks.3.hook_resid_post"])
    return acts, record


def _minilm_eval(model: Any) -> list[str]:
    return pydoc_split(model.tokenizer)[1]


# ------------------------------------------------------------------------------------------------
# TMS: one instance of zoo:tms-20-5, as a model of its own
# ------------------------------------------------------------------------------------------------

TMS_MODEL, TMS_INSTANCE = "tms-20-5", 4
TMS_EVAL_BATCH, TMS_EVAL_SEED = 8192, 12345


def tms_instance(name: str = TMS_MODEL, instance: int = TMS_INSTANCE) -> Any:
    """Instance ``instance`` of zoo model ``name`` as a one-instance ``ToyModel`` (a ``HookedModel``).

    Its ``hidden`` hook is ``[batch, 1, m]``: exactly that instance's h = W x, so an SAE on it can
    be spliced and evaluated without touching the other instances.
    """
    import interp
    from interp.models import zoo
    from interp.models.zoo.tms import ToyModel

    full, _ = zoo.load_zoo(name)
    if not 0 <= instance < full.n_instances:
        raise InputError(f"{name} has instances 0..{full.n_instances - 1}; got instance={instance}")
    one = ToyModel(
        1,
        full.n_features,
        full.n_hidden,
        full.importance[instance],
        full.feature_probability[instance],
        relu=isinstance(full.out, torch.nn.ReLU),
    )
    with torch.no_grad():
        one.W.copy_(full.W[instance : instance + 1])
        one.b_final.copy_(full.b_final[instance : instance + 1])
    one.eval()
    return interp.load(
        one, name=f"{name}[instance {instance}]", input_shape=(1, full.n_features), input_range=(0.0, 1.0)
    )


def _tms_features(model: Any, batch: int, seed: int) -> torch.Tensor:
    """``batch`` samples of the model's input distribution with at least one feature present.

    At p = 0.01 most samples (0.99^20 = 82%) are all zero: h = 0 carries nothing to reconstruct
    and makes per-sample ratios (cossim, l2_ratio) undefined, so they are drawn again.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    parts, have = [], 0
    while have < batch:
        x = model.module.generate_batch(batch, rng)
        x = x[x.flatten(1).sum(-1) > 0]
        parts.append(x)
        have += len(x)
    return torch.cat(parts)[:batch]


def _tms_train(model: Any, fast: bool) -> tuple[Any, dict[str, Any]]:
    n, seed = (50_000 if fast else 400_000), 2024
    x = _tms_features(model, n, seed)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names=["hidden.hook_out"], stop_early=True)
    h = cache["hidden.hook_out"].reshape(-1, model.module.n_hidden)
    record = {
        "corpus": f"zoo:{TMS_MODEL} instance {TMS_INSTANCE}: generate_batch samples (its training "
        "distribution), all-zero samples drawn again",
        "samples": n,
        "numpy_seed": seed,
        "feature_probability": float(model.module.feature_probability[0, 0]),
    }
    return h, record


def _tms_eval(model: Any) -> torch.Tensor:
    return _tms_features(model, TMS_EVAL_BATCH, TMS_EVAL_SEED)


# ------------------------------------------------------------------------------------------------
# modadd-113: every (a, b, =) input
# ------------------------------------------------------------------------------------------------


def _modadd_inputs() -> torch.Tensor:
    from interp.models.zoo.modadd import all_pairs

    return all_pairs(113)


def _modadd_train(model: Any, fast: bool) -> tuple[Any, dict[str, Any]]:
    tokens = _modadd_inputs()
    if fast:
        tokens = tokens[:2048]
    x, y = capture_activations(model, tokens, ["blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"], 1024)
    record = {
        "corpus": "zoo:modadd-113 inputs (a, b, =) for every a, b in 0..112, all 3 positions",
        "sequences": len(tokens),
        "tokens": len(x),
    }
    return (x, y), record


def _modadd_eval(model: Any) -> torch.Tensor:
    return _modadd_inputs()


def modadd_task_metrics(model: Any, sae: Any, batch_size: int = 2048) -> dict[str, float]:
    """The task with the transcoder spliced in (no error term), on every input.

    modadd-113 predicts ``(a + b) mod 113`` at the last position only (its output vocabulary has no
    ``=`` token), so SAELens's next-token CE score does not apply. The same score on the task
    instead: ``task_loss_score = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)``, the MLP
    output zero-ablated for the baseline, with accuracies.
    """
    import torch.nn.functional as F

    from interp.sae.splicing import run_with_saes

    tokens = _modadd_inputs()
    labels = (tokens[:, 0] + tokens[:, 1]) % 113
    site = sae.cfg.hook_out
    sums = {"clean": 0.0, "spliced": 0.0, "ablated": 0.0}
    correct = dict.fromkeys(sums, 0)

    def zero(act: torch.Tensor, ctx: Any) -> torch.Tensor:
        return torch.zeros_like(act)

    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            x, y = tokens[i : i + batch_size], labels[i : i + batch_size]
            runs = {
                "clean": model(x),
                "spliced": run_with_saes(model, x, [sae], use_error_term=False),
                "ablated": model.run_with_hooks(x, [(site, zero)]),
            }
            for key, logits in runs.items():
                last = logits[:, -1].double()
                sums[key] += float(F.cross_entropy(last, y, reduction="sum"))
                correct[key] += int((last.argmax(-1) == y).sum())
    n = len(tokens)
    ce = {k: v / n for k, v in sums.items()}
    return {
        "task_loss_without_sae": ce["clean"],
        "task_loss_with_sae": ce["spliced"],
        "task_loss_with_ablation": ce["ablated"],
        "task_loss_score": (ce["ablated"] - ce["spliced"]) / (ce["ablated"] - ce["clean"]),
        "accuracy_without_sae": correct["clean"] / n,
        "accuracy_with_sae": correct["spliced"] / n,
        "accuracy_with_ablation": correct["ablated"] / n,
    }


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------

RECIPES: dict[str, DictionaryRecipe] = {
    r.name: r
    for r in (
        DictionaryRecipe(
            name="minilm-l3-resid-topk",
            description="TopK SAE (1536 latents, k=32) on MiniLM blocks.3.hook_resid_post, "
            "trained on Python's documentation (pydoc_data.topics)",
            model="minilm",
            hook="blocks.3.hook_resid_post",
            options={
                "arch": "topk",
                "d_sae": 1536,
                "k": 32,
                "tokens": 1_200_000,
                "batch_size": 1024,
                "lr": 5e-4,
                "lr_warmup_steps": 50,
                "lr_decay_steps": 300,
                "dead_after_tokens": 50_000,
                "seed": 0,
            },
            fast_overrides={"tokens": 8192, "lr_warmup_steps": 0, "lr_decay_steps": 0},
            train_data=_minilm_train,
            eval_data=_minilm_eval,
            eval_options={"batch_size": 16},
        ),
        DictionaryRecipe(
            name="tms-20-5-hidden",
            description=f"standard SAE (20 latents, L1) on the 5-d hidden layer of zoo:{TMS_MODEL} "
            f"instance {TMS_INSTANCE} (p=0.01: 12 of 20 features in superposition)",
            model=f"zoo:{TMS_MODEL}",
            hook="hidden.hook_out",
            options={
                "arch": "standard",
                "d_sae": 20,
                "k": None,
                "tokens": 4_000_000,
                "batch_size": 1024,
                "lr": 3e-3,
                "l1_coefficient": 0.3,
                "l1_warmup_steps": 200,
                "lr_decay_steps": 800,
                "resample_every": 400,
                "dead_after_tokens": 100_000,
                "seed": 0,
            },
            fast_overrides={
                "tokens": 100_000,
                "l1_warmup_steps": 0,
                "lr_decay_steps": 0,
                "resample_every": 0,
            },
            train_data=_tms_train,
            eval_data=_tms_eval,
            eval_options={"batch_size": 4096},
        ),
        DictionaryRecipe(
            name="modadd-113-mlp0-transcoder",
            description="transcoder (1024 latents, L1) from blocks.0.mlp.hook_in to blocks.0.hook_mlp_out "
            "of zoo:modadd-113, trained on every (a, b, =) input",
            model="zoo:modadd-113",
            hook="blocks.0.mlp.hook_in",
            options={
                "arch": "transcoder",
                "hook_out": "blocks.0.hook_mlp_out",
                "d_sae": 1024,
                "k": None,
                "tokens": 2_000_000,
                "batch_size": 2048,
                "lr": 1e-3,
                "l1_coefficient": 5.0,
                "l1_warmup_steps": 200,
                "lr_decay_steps": 300,
                "resample_every": 200,
                "dead_after_tokens": 50_000,
                "seed": 0,
            },
            fast_overrides={"tokens": 20_000, "l1_warmup_steps": 0, "lr_decay_steps": 0, "resample_every": 0},
            train_data=_modadd_train,
            eval_data=_modadd_eval,
            eval_options={"batch_size": 1024, "model_metrics": False},
            task_metrics=modadd_task_metrics,
        ),
    )
}
DICTIONARY_NAMES: tuple[str, ...] = tuple(RECIPES)


def get_dictionary_recipe(name: str) -> DictionaryRecipe:
    """The recipe called ``name`` (InputError listing the valid names otherwise)."""
    if name not in RECIPES:
        near = closest(str(name), DICTIONARY_NAMES)
        hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
        raise InputError(f"unknown zoo dictionary {name!r}.{hint} Valid: {', '.join(DICTIONARY_NAMES)}")
    return RECIPES[name]


LISTED_METRICS = ("explained_variance", "mse", "l0", "dead_fraction", "ce_loss_score")


def describe() -> list[dict[str, Any]]:
    """One dict per zoo dictionary: name, description, model, hook, has_checkpoint, and the headline
    ``metrics`` its shipped ``cfg.json`` records (empty without a checkpoint)."""
    import json

    out = []
    for name, recipe in RECIPES.items():
        cfg_path = ZOO_DIR / name / "cfg.json"
        has = cfg_path.is_file() and (ZOO_DIR / name / "sae_weights.safetensors").is_file()
        recorded = (
            json.loads(cfg_path.read_text())["metadata"].get("zoo", {}).get("metrics", {}) if has else {}
        )
        metrics = {k: recorded[k] for k in LISTED_METRICS if k in recorded}
        out.append(
            {
                "name": name,
                "description": recipe.description,
                "model": recipe.model,
                "hook": recipe.hook,
                "has_checkpoint": has,
                "metrics": metrics,
            }
        )
    return out


def source_model(name: str) -> Any:
    """The ``HookedModel`` dictionary ``name`` reads (for the TMS one: its single instance)."""
    import interp

    recipe = get_dictionary_recipe(name)
    if recipe.model == f"zoo:{TMS_MODEL}":
        return tms_instance()
    return interp.load(recipe.model)


def eval_inputs(name: str, model: Any | None = None) -> Any:
    """The held-out inputs the recorded evaluations were computed on."""
    recipe = get_dictionary_recipe(name)
    return recipe.eval_data(model if model is not None else source_model(name))


def evaluate_dictionary(name: str, sae: Any, model: Any | None = None) -> Any:
    """``S.evaluate`` of ``sae`` on the recipe's model and held-out inputs (what ``metadata.zoo`` records)."""
    from interp.sae.evaluation import evaluate

    recipe = get_dictionary_recipe(name)
    model = model if model is not None else source_model(name)
    return evaluate(model, sae, recipe.eval_data(model), **recipe.eval_options)


def train_dictionary(
    name: str, out_dir: str | Path | None = None, *, fast: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Retrain ``name`` from its recipe, evaluate it, and save it to ``out_dir/NAME``.

    ``out_dir`` defaults to the shipped zoo folder; ``fast=True`` (the tests' small budget) must be
    given an explicit ``out_dir`` so it never replaces a shipped dictionary. Returns the ``zoo``
    metadata written to ``cfg.json`` (recipe, data record, metrics, seconds).
    """
    from interp.checks import writable_dir
    from interp.sae.io import save
    from interp.sae.training import train

    recipe = get_dictionary_recipe(name)
    if fast and out_dir is None:
        raise InputError(
            "fast=True trains a reduced dictionary: pass out_dir so it cannot replace the shipped one"
        )
    target = Path(out_dir) if out_dir is not None else ZOO_DIR
    writable_dir(target, "output directory")
    start = time.perf_counter()
    model = source_model(name)
    options = recipe.resolved_options(fast)
    data, record = recipe.train_data(model, fast)
    sae = train(model, recipe.hook, data, progress=progress, data_kind="activations", **options)
    seconds = time.perf_counter() - start
    result = evaluate_dictionary(name, sae, model)
    zoo_record = {
        "name": name,
        "description": recipe.description,
        "model": recipe.model,
        "data": record,
        "eval": {**result.config, "options": dict(recipe.eval_options)},
        "metrics": {k: float(v) for k, v in result.items()},
        "task_metrics": recipe.task_metrics(model, sae) if recipe.task_metrics else {},
        "train_seconds": round(seconds, 1),
        "fast": fast,
        "retrain": f"interp zoo train {name}",
    }
    if name == "tms-20-5-hidden":
        zoo_record["instance"] = TMS_INSTANCE
    sae.cfg.metadata["model_name"] = recipe.model
    sae.cfg.metadata["zoo"] = zoo_record
    save(sae, target / name)
    return zoo_record
