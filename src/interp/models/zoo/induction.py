"""induction-2l / induction-1l: attention-only transformers trained to continue repeated spans.

Induction heads (Elhage et al. 2021; Olsson et al. 2022) complete ``... A B ... A -> B``: a layer-0
*previous-token* head writes "the token before me was A" into each position, and a layer-1 head uses
it (K-composition) to attend from the second ``A`` to the ``B`` that followed the first one, then
copies ``B``. A one-layer model cannot compose heads, so ``induction-1l`` is the control: same data,
same budget, no induction mechanism.

Training data (fresh every step, infinite): ``BOS`` + 64 uniform tokens over 64 symbols, with one
span of length U{8..24} copied from a random earlier start to a random later, non-overlapping start.
The *offset between the copies varies*: with a fixed offset a single layer-0 head can solve the
repeat positionally and no induction head forms.

Evaluation: ``[BOS, r, r]`` with ``r`` 20 uniform tokens (:func:`repeated_tokens`). The induction score
of a head is its mean attention from each second-copy token to the token after its first occurrence
(over second-half queries only, so a perfect head scores 1); the previous-token score is the mean
attention to the immediately preceding position.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from interp.models.zoo.bridge import native_bridge_config
from interp.models.zoo.recipe import Config, FitResult, Recipe

BASE_CONFIG: Config = {
    "vocab": 64,  # BOS is token id `vocab`, so d_vocab = vocab + 1
    "seq_len": 64,  # random tokens after BOS in a training sequence
    "span_min": 8,
    "span_max": 24,
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "n_ctx": 80,
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "seed": 0,
    "data_seed": 1,
    "lr": 1e-3,
    "weight_decay": 0.01,
    "betas": [0.9, 0.999],
    "batch_size": 64,
    "steps": 4_000,
    "log_every": 50,
    "eval_half_len": 20,
    "eval_batch": 256,
    "eval_seed": 12_345,
    "log_eval_batch": 32,
}

FAST_OVERRIDES: Config = {"steps": 1_500, "log_every": 100}


def bridge_config(cfg: Config) -> Any:
    """The TransformerBridgeConfig for ``cfg``: attention only, the vocabulary plus BOS."""
    return native_bridge_config(
        cfg,
        "n_ctx",
        "normalization_type",
        "positional_embedding_type",
        d_vocab=cfg["vocab"] + 1,
        attn_only=True,
        act_fn=None,
    )


def build(cfg: Config) -> nn.Module:
    """A fresh attention-only TransformerBridge (seeded init)."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_native(bridge_config(cfg))


def repeated_tokens(batch: int, half_len: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """``[batch, 1 + 2*half_len]`` tokens ``[BOS, r, r]``: BOS = ``vocab``, r uniform in ``0..vocab-1``."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, vocab, (batch, half_len), generator=gen)
    bos = torch.full((batch, 1), vocab, dtype=torch.long)
    return torch.cat([bos, r, r], dim=1)


def copied_span_batch(cfg: Config, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Training data: ``[BOS, x]`` with one span of ``x`` copied later at a random offset.

    Span length L ~ U{span_min..span_max}; source start s ~ U{0..T-2L}; destination start
    d ~ U{s+L..T-L}, so the copies never overlap and their distance varies per sequence.
    """
    T, V = int(cfg["seq_len"]), int(cfg["vocab"])
    x = torch.randint(0, V, (batch, T), generator=gen)
    length = torch.randint(int(cfg["span_min"]), int(cfg["span_max"]) + 1, (batch, 1), generator=gen)
    src = (torch.rand(batch, 1, generator=gen) * (T - 2 * length + 1)).long()
    dst = src + length + (torch.rand(batch, 1, generator=gen) * (T - length - (src + length) + 1)).long()
    pos = torch.arange(T)[None, :]
    in_copy = (pos >= dst) & (pos < dst + length)
    index = torch.where(in_copy, pos - dst + src, pos)
    x = x.gather(1, index)
    bos = torch.full((batch, 1), V, dtype=torch.long)
    return torch.cat([bos, x], dim=1)


def _patterns(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and attention patterns ``[layer, batch, head, query, key]`` from the bridge's hooks."""
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    n_layers = model.cfg.n_layers
    return logits, torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(n_layers)])


def head_scores(patterns: torch.Tensor, half_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Induction and previous-token scores ``[layer, head]`` from patterns of ``[BOS, r, r]`` inputs.

    Induction: mean over second-copy queries q (positions half_len+1 .. 2*half_len) of the attention
    to key q - half_len + 1 (the token after the earlier occurrence). Previous token: mean over
    queries q >= 1 of the attention to q - 1.
    """
    n = half_len
    q_ind = torch.arange(n + 1, 2 * n + 1)
    induction = patterns[..., q_ind, q_ind - n + 1].mean(dim=(1, 3))
    q_prev = torch.arange(1, 2 * n + 1)
    previous = patterns[..., q_prev, q_prev - 1].mean(dim=(1, 3))
    return induction, previous


def half_losses(logits: torch.Tensor, tokens: torch.Tensor, half_len: int) -> tuple[float, float]:
    """Next-token loss on the first copy and on the predictable part of the repeated copy.

    First half: predictions at positions 0..n-1 (targets r_1..r_n; nothing to copy yet).
    Repeated half: predictions at positions n+1..2n-1 (targets r_2..r_n of the second copy).
    """
    n = half_len
    logprobs = logits.log_softmax(dim=-1)[:, :-1]
    nll = -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]
    return nll[:, :n].mean().item(), nll[:, n + 1 :].mean().item()


def fit(model: nn.Module, cfg: Config, progress: bool = True) -> FitResult:
    """AdamW on fresh copied-span batches; logs loss and the max induction score every ``log_every``."""
    gen = torch.Generator().manual_seed(int(cfg["data_seed"]))
    log_tokens = repeated_tokens(int(cfg["log_eval_batch"]), int(cfg["eval_half_len"]), int(cfg["vocab"]), 7)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"])
    )
    history: dict[str, list[Any]] = {
        k: [] for k in ("step", "loss", "max_induction_score", "max_prev_token_score", "repeated_half_loss")
    }
    running, count = 0.0, 0
    bar = tqdm(range(1, int(cfg["steps"]) + 1), desc=cfg["name"], disable=not progress, mininterval=1.0)
    for step in bar:
        model.train()
        tokens = copied_span_batch(cfg, int(cfg["batch_size"]), gen)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running, count = running + loss.item(), count + 1
        if step % cfg["log_every"] == 0:
            model.eval()
            with torch.no_grad():
                eval_logits, patterns = _patterns(model, log_tokens)
            induction, previous = head_scores(patterns, int(cfg["eval_half_len"]))
            _, repeated = half_losses(eval_logits, log_tokens, int(cfg["eval_half_len"]))
            history["step"].append(step)
            history["loss"].append(running / count)  # mean training loss since the last log
            history["max_induction_score"].append(induction.max().item())
            history["max_prev_token_score"].append(previous.max().item())
            history["repeated_half_loss"].append(repeated)
            bar.set_postfix(
                loss=f"{running / count:.3f}", induction=f"{induction.max().item():.2f}", refresh=False
            )
            running, count = 0.0, 0
    bar.close()
    model.eval()

    ind = history["max_induction_score"]
    crossed = [s for s, v in zip(history["step"], ind, strict=True) if v > 0.3]
    drops = [history["loss"][i] - history["loss"][i + 1] for i in range(len(history["loss"]) - 1)]
    steepest = history["step"][1 + max(range(len(drops)), key=drops.__getitem__)] if drops else None
    training = {
        "steps": int(cfg["steps"]),
        "tokens_seen": int(cfg["steps"]) * int(cfg["batch_size"]) * (int(cfg["seq_len"]) + 1),
        "first_step_max_induction_above_0.3": crossed[0] if crossed else None,
        "step_of_steepest_loss_drop": steepest,
    }
    return FitResult(history=history, training=training)


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config) -> dict[str, Any]:
    """Head scores and first/repeated-half losses on 256 fixed ``[BOS, r(20), r(20)]`` sequences."""
    n = int(cfg["eval_half_len"])
    tokens = repeated_tokens(int(cfg["eval_batch"]), n, int(cfg["vocab"]), int(cfg["eval_seed"]))
    logits, patterns = _patterns(model, tokens)
    induction, previous = head_scores(patterns, n)
    first, repeated = half_losses(logits, tokens, n)
    n_heads = induction.shape[1]
    top_ind, top_prev = int(induction.argmax()), int(previous.argmax())
    return {
        "first_half_loss": first,
        "repeated_half_loss": repeated,
        "induction_scores": induction.tolist(),
        "prev_token_scores": previous.tolist(),
        "max_induction_score": induction.max().item(),
        "top_induction_head": [top_ind // n_heads, top_ind % n_heads],
        "max_prev_token_score": previous.max().item(),
        "top_prev_token_head": [top_prev // n_heads, top_prev % n_heads],
    }


_INPUT = (
    "tokens [batch, seq<=80] over 0..63 with BOS = 64 first; e.g. zoo.repeated_tokens(8, 20) = [BOS, r, r]"
)

RECIPES = [
    Recipe(
        name="induction-2l",
        kind="transformer",
        description=(
            "2-layer attention-only transformer (d_model 64, 4 heads of 16, LN) trained on random tokens "
            "with a copied span at a varying offset: forms a previous-token head and induction heads."
        ),
        input=_INPUT,
        config={**BASE_CONFIG, "name": "induction-2l"},
        build=build,
        fit=fit,
        evaluate=evaluate,
        fast_overrides=FAST_OVERRIDES,
    ),
    Recipe(
        name="induction-1l",
        kind="transformer",
        description=(
            "Control for induction-2l: the same data and budget with a single attention layer, which "
            "cannot compose heads and so cannot form induction heads."
        ),
        input=_INPUT,
        config={**BASE_CONFIG, "name": "induction-1l", "n_layers": 1},
        build=build,
        fit=fit,
        evaluate=evaluate,
        fast_overrides=FAST_OVERRIDES,
    ),
]
