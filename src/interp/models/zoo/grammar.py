"""grammar-4l: a 4-layer decoder with MLPs and LayerNorm, trained on a seeded toy language with planted mechanisms.

The zoo's other language models are attention-only (induction) or arithmetic (modadd); circuit tracing
needs MLPs to replace with transcoders and behaviours whose ground truth is known. Every training
sequence is ``BOS`` followed by episodes of four tasks, drawn from a seeded generator (no data files):

- **agreement** -- subject-verb number agreement across an intervening clause with an attractor noun::

      the dog that the cats chase runs .        the dogs near the cat sleep .

  The main verb's number is fixed by the *subject* (the first noun), never by the nearer noun.
- **brackets** -- a random nesting of ``( )``, ``[ ]``, ``{ }`` and ``" "`` around filler letters,
  ended by closing every open bracket: whenever a closer comes, its type is fixed by the innermost
  open bracket (quotes hold only letters).
- **ioi** -- indirect-object identification (Wang et al. 2022)::

      when Mary and John went to the store , John gave a drink to Mary .

  The answer is the name that is not repeated.
- **copy** -- ``copy : w1 .. wk | w1 .. wk .``: the second copy is predictable by induction.

Words are whole tokens with readable names (``model.to_str_tokens`` shows ``the dog that ...``).
Episodes are packed after one ``BOS`` up to ``seq_len`` tokens; evaluation prompts are one episode
after ``BOS``. The recorded metrics are per-task accuracies on fixed held-out prompts
(:func:`evaluate`); :func:`task_prompts` builds those prompts for analyses and tests.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from interp.models.zoo.bridge import native_bridge_config
from interp.models.zoo.recipe import Config, FitResult, Recipe

NAME = "grammar-4l"

SPECIAL = ["BOS", ".", ",", "|", ":"]
FUNCTION = ["the", "that", "near", "when", "and", "went", "to", "gave", "a", "copy"]
OPENERS = ["(", "[", "{", '"']
CLOSERS = [")", "]", "}", '"']
NOUNS_SG = ["dog", "cat", "bird", "horse", "child", "farmer", "teacher", "doctor", "king", "girl", "boy",
            "student"]  # fmt: skip
NOUNS_PL = ["dogs", "cats", "birds", "horses", "children", "farmers", "teachers", "doctors", "kings", "girls",
            "boys", "students"]  # fmt: skip
INTRANS_SG = ["runs", "sleeps", "sings", "laughs", "waits", "smiles"]
INTRANS_PL = ["run", "sleep", "sing", "laugh", "wait", "smile"]
TRANS_SG = ["sees", "likes", "helps", "chases", "follows", "knows"]
TRANS_PL = ["see", "like", "help", "chase", "follow", "know"]
NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna", "Kate", "Paul", "Sam", "Lucy", "Mark", "Emma", "Jack",
         "Lily", "Ben", "Rose"]  # fmt: skip
PLACES = ["store", "park", "school", "beach", "market", "garden"]
OBJECTS = ["drink", "book", "ball", "letter", "gift", "apple"]
LETTERS = ["x", "y", "z", "w", "u", "v", "p", "q"]


def _words() -> list[str]:
    words: list[str] = []
    for group in (SPECIAL, FUNCTION, OPENERS[:3], CLOSERS[:3], ['"'], NOUNS_SG, NOUNS_PL, INTRANS_SG,
                  INTRANS_PL, TRANS_SG, TRANS_PL, NAMES, PLACES, OBJECTS, LETTERS):  # fmt: skip
        words += [w for w in group if w not in words]
    return words


WORDS: list[str] = _words()
ID: dict[str, int] = {w: i for i, w in enumerate(WORDS)}
BOS = ID["BOS"]
TASKS = ("agreement", "brackets", "ioi", "copy")
COPY_POOL = NOUNS_SG + NOUNS_PL + NAMES + PLACES + OBJECTS + LETTERS

SAMPLES: tuple[str, ...] = (
    "when Mary and John went to the store , John gave a drink to",
    "the dog that the cats chase",
    "the girls near the king",
    "( x [ y { z } w",
    "copy : Mary park cat x | Mary park",
    "when Tom and Anna went to the beach , Tom gave a book to",
    "the teacher that helps the students",
)  # inputs of each task, for the explorer and examples

CONFIG: Config = {
    "name": NAME,
    "n_layers": 4,
    "d_model": 128,
    "n_heads": 4,
    "d_head": 32,
    "d_mlp": 512,
    "act_fn": "gelu",
    "n_ctx": 64,
    "d_vocab": len(WORDS),
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "seq_len": 48,  # tokens per packed training sequence, BOS included
    "task_weights": [0.35, 0.2, 0.3, 0.15],  # agreement, brackets, ioi, copy
    "seed": 0,
    "data_seed": 1,
    "lr": 3e-3,
    "warmup": 100,
    "min_lr_frac": 0.1,
    "weight_decay": 0.01,
    "betas": [0.9, 0.98],
    "batch_size": 32,
    "steps": 1_200,
    "log_every": 100,
    "eval_per_task": 200,
    "eval_seed": 12_345,
    "log_eval_per_task": 40,
}

FAST_OVERRIDES: Config = {"steps": 120, "log_every": 40, "eval_per_task": 40, "log_eval_per_task": 10}


# ------------------------------------------------------------------------------------------------
# The language
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Episode:
    """One task instance: its words and, for scored tasks, where the answer is.

    ``answer_at`` is the index in ``words`` of the token to predict (the prompt is ``words[:answer_at]``);
    ``info`` holds what the metric needs (the subject's number, the IOI names, ...).
    """

    task: str
    words: list[str]
    answer_at: int
    info: dict[str, Any]


def agreement(rng: random.Random) -> Episode:
    """``the N1 <clause> V1 ...``: V1 agrees with N1; the clause holds an attractor noun N2."""
    plural = rng.random() < 0.5
    i = rng.randrange(len(NOUNS_SG))
    subject = (NOUNS_PL if plural else NOUNS_SG)[i]
    n2_plural = rng.random() < 0.5
    n2 = rng.choice(NOUNS_PL if n2_plural else NOUNS_SG)
    kind = rng.choice(["that_obj", "that_subj", "near", "none"])
    words = ["the", subject]
    if kind == "that_obj":  # the dog that the cats chase ...
        words += ["that", "the", n2, rng.choice(TRANS_PL if n2_plural else TRANS_SG)]
    elif kind == "that_subj":  # the dog that chases the cats ...
        words += ["that", rng.choice(TRANS_PL if plural else TRANS_SG), "the", n2]
    elif kind == "near":  # the dog near the cats ...
        words += ["near", "the", n2]
    answer_at = len(words)
    if rng.random() < 0.5:
        words += [rng.choice(INTRANS_PL if plural else INTRANS_SG), "."]
    else:
        words += [rng.choice(TRANS_PL if plural else TRANS_SG), "the", rng.choice(NOUNS_SG + NOUNS_PL), "."]
    info = {"plural": plural, "noun_index": i, "attractor_plural": n2_plural, "clause": kind}
    return Episode("agreement", words, answer_at, info)


def brackets(rng: random.Random) -> Episode:
    """Random nesting (depth <= 3) over filler letters, then every open bracket closed in order."""
    words: list[str] = []
    stack: list[int] = []
    for _ in range(rng.randint(4, 10)):
        in_quote = bool(stack) and stack[-1] == 3
        r = rng.random()
        if stack and r < 0.3:
            words.append(CLOSERS[stack.pop()])
        elif not in_quote and len(stack) < 3 and r < 0.6:
            kind = rng.randrange(4)
            stack.append(kind)
            words.append(OPENERS[kind])
        else:
            words.append(rng.choice(LETTERS))
    if not stack:  # every episode has at least one closer to score
        kind = rng.randrange(4)
        stack.append(kind)
        words += [OPENERS[kind], rng.choice(LETTERS)]
    answer_at = len(words)
    info = {"expected": CLOSERS[stack[-1]]}
    while stack:
        words.append(CLOSERS[stack.pop()])
    words.append(".")
    return Episode("brackets", words, answer_at, info)


def ioi(rng: random.Random, names: tuple[str, str, str] | None = None) -> Episode:
    """``when A and B went to the P , S gave a O to IO .`` with S the repeated name.

    ``names`` = (A, B, S) fixes the names (S must be A or B, or a third name for a corrupted prompt,
    in which case the answer is ill-defined and ``info["io"]`` is A).
    """
    if names is None:
        a, b = rng.sample(NAMES, 2)
        s = rng.choice([a, b])
    else:
        a, b, s = names
    io = b if s == a else a
    words = ["when", a, "and", b, "went", "to", "the", rng.choice(PLACES), ",", s, "gave", "a",
             rng.choice(OBJECTS), "to"]  # fmt: skip
    answer_at = len(words)
    words += [io, "."]
    return Episode("ioi", words, answer_at, {"io": io, "s": s, "a": a, "b": b})


def copy(rng: random.Random) -> Episode:
    """``copy : w1 .. wk | w1 .. wk .``; scored on the whole second copy."""
    span = [rng.choice(COPY_POOL) for _ in range(rng.randint(3, 8))]
    words = ["copy", ":", *span, "|"]
    answer_at = len(words)
    words += [*span, "."]
    return Episode("copy", words, answer_at, {"k": len(span)})


def other_number(episode: Episode) -> Episode:
    """The agreement ``episode`` with its subject in the other grammatical number (and every word
    that agrees with it: the relative clause's verb in ``the dog that chases ...`` and the main verb).

    The two prompts have the same length and differ only in the words that carry the subject's
    number, so the right answer's number flips and nothing else does.
    """
    if episode.task != "agreement":
        from interp.errors import InputError

        raise InputError(f"other_number needs an agreement episode, got a {episode.task!r} one")
    swap: dict[str, str] = {}
    for singular, plural in ((NOUNS_SG, NOUNS_PL), (INTRANS_SG, INTRANS_PL), (TRANS_SG, TRANS_PL)):
        swap.update(zip(singular, plural, strict=True))
        swap.update(zip(plural, singular, strict=True))
    words = list(episode.words)
    agreeing = [1, episode.answer_at] + ([3] if episode.info["clause"] == "that_subj" else [])
    for i in agreeing:
        words[i] = swap[words[i]]
    info = {**episode.info, "plural": not episode.info["plural"]}
    return Episode("agreement", words, episode.answer_at, info)


GENERATORS = {"agreement": agreement, "brackets": brackets, "ioi": ioi, "copy": copy}


def encode(words: list[str]) -> list[int]:
    return [ID[w] for w in words]


def packed_batch(cfg: Config, batch: int, rng: random.Random) -> torch.Tensor:
    """``[batch, seq_len]`` training tokens: BOS, then episodes of random tasks, cut at ``seq_len``."""
    seq_len = int(cfg["seq_len"])
    rows = []
    for _ in range(batch):
        ids = [BOS]
        while len(ids) < seq_len:
            task = rng.choices(TASKS, weights=cfg["task_weights"])[0]
            ids += encode(GENERATORS[task](rng).words)
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)


def task_prompts(task: str, n: int, seed: int = 0) -> list[Episode]:
    """``n`` seeded episodes of ``task`` (one of TASKS); the prompt of each is ``BOS`` + words[:answer_at]."""
    if task not in GENERATORS:
        from interp.errors import InputError

        raise InputError(f"unknown grammar task {task!r}; the tasks are {', '.join(TASKS)}")
    rng = random.Random(f"{task}-{seed}")
    return [GENERATORS[task](rng) for _ in range(n)]


def prompt_tokens(episodes: list[Episode]) -> torch.Tensor:
    """``[n, 1 + answer_at]`` tokens of equal-length prompts (BOS + words up to the answer)."""
    lengths = {e.answer_at for e in episodes}
    if len(lengths) != 1:
        from interp.errors import InputError

        raise InputError("prompt_tokens needs episodes whose prompts have one length; group them first")
    return torch.tensor([[BOS, *encode(e.words[: e.answer_at])] for e in episodes], dtype=torch.long)


# ------------------------------------------------------------------------------------------------
# Model, training and metrics
# ------------------------------------------------------------------------------------------------


def bridge_config(cfg: Config) -> Any:
    """The TransformerBridgeConfig for ``cfg``: MLPs on, every other field read from ``cfg``."""
    return native_bridge_config(
        cfg,
        "d_mlp",
        "n_ctx",
        "d_vocab",
        "act_fn",
        "normalization_type",
        "positional_embedding_type",
        attn_only=False,
    )


def build(cfg: Config) -> nn.Module:
    """A fresh TransformerBridge with MLPs and LayerNorm (seeded init)."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_native(bridge_config(cfg))


VERB_IDS = {
    False: [ID[w] for w in INTRANS_SG + TRANS_SG],
    True: [ID[w] for w in INTRANS_PL + TRANS_PL],
}
CLOSER_IDS = [ID[w] for w in CLOSERS]


def _grouped(episodes: list[Episode]) -> list[list[Episode]]:
    groups: dict[int, list[Episode]] = {}
    for e in episodes:
        groups.setdefault(e.answer_at, []).append(e)
    return [groups[k] for k in sorted(groups)]


def task_metrics(model: nn.Module, task: str, episodes: list[Episode]) -> dict[str, float]:
    """Accuracy (and, where defined, a logit difference) of ``model`` on ``episodes`` of ``task``.

    - agreement: the best verb of the subject's number outscores the best verb of the other number
      (``agreement_acc``; the next word need not be a verb: after ``the dog`` a clause may follow);
      ``agreement_attractor_acc`` on the prompts whose clause noun has the other number; and the
      mean logit difference between those two verbs.
    - brackets: among the four closers, the top one is the innermost open bracket's.
    - ioi: the top token is the indirect object; mean logit(IO) - logit(S).
    - copy: every token of the second copy is the top prediction (token accuracy over the copy).
    """
    hits, total, diffs, hard = 0, 0, [], []
    for group in _grouped(episodes):
        if task == "copy":
            tokens = torch.tensor([[BOS, *encode(e.words)] for e in group])
            # predictions of the second copy: logits at positions answer_at .. answer_at + k - 1
            # (BOS shifts word index i to position i + 1, so position p predicts word p)
            start = group[0].answer_at
            kk = torch.tensor([e.info["k"] for e in group])
            logits = model(tokens)
            pred = logits[:, start : start + int(kk.max())].argmax(-1)
            target = tokens[:, start + 1 : start + 1 + int(kk.max())]
            mask = torch.arange(int(kk.max()))[None] < kk[:, None]
            hits += int(((pred == target) & mask).sum())
            total += int(mask.sum())
            continue
        logits = model(prompt_tokens(group))[:, -1]
        for e, row in zip(group, logits, strict=True):
            total += 1
            if task == "agreement":
                right, wrong = VERB_IDS[e.info["plural"]], VERB_IDS[not e.info["plural"]]
                margin = float(row[right].max() - row[wrong].max())
                hits += int(margin > 0)
                diffs.append(margin)
                if e.info["clause"] != "none" and e.info["attractor_plural"] != e.info["plural"]:
                    hard.append(margin > 0)
            elif task == "brackets":
                hits += int(CLOSER_IDS[int(row[CLOSER_IDS].argmax())] == ID[e.info["expected"]])
            elif task == "ioi":
                hits += int(int(row.argmax()) == ID[e.info["io"]])
                diffs.append(float(row[ID[e.info["io"]]] - row[ID[e.info["s"]]]))
    out = {f"{task}_acc": hits / max(total, 1)}
    if hard:
        out[f"{task}_attractor_acc"] = sum(hard) / len(hard)
    if diffs:
        out[f"{task}_logit_diff"] = sum(diffs) / len(diffs)
    return out


def _lr(cfg: Config, step: int) -> float:
    warm, steps = int(cfg["warmup"]), int(cfg["steps"])
    if step <= warm:
        return cfg["lr"] * step / warm
    frac = (step - warm) / max(steps - warm, 1)
    floor = cfg["min_lr_frac"]
    return cfg["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def _all_metrics(model: nn.Module, n: int, seed: int) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for task in TASKS:
        metrics.update(task_metrics(model, task, task_prompts(task, n, seed)))
    return metrics


def fit(model: nn.Module, cfg: Config, progress: bool = True) -> FitResult:
    """AdamW (warmup + cosine) on fresh packed batches; logs loss and per-task accuracy."""
    rng = random.Random(int(cfg["data_seed"]))
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"])
    )
    history: dict[str, list[Any]] = {"step": [], "loss": [], **{f"{t}_acc": [] for t in TASKS}}
    running, count = 0.0, 0
    bar = tqdm(range(1, int(cfg["steps"]) + 1), desc=cfg["name"], disable=not progress, mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        model.train()
        tokens = packed_batch(cfg, int(cfg["batch_size"]), rng)
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running, count = running + loss.item(), count + 1
        if step % cfg["log_every"] == 0:
            model.eval()
            with torch.no_grad():
                accs = _all_metrics(model, int(cfg["log_eval_per_task"]), 7)
            history["step"].append(step)
            history["loss"].append(running / count)
            for t in TASKS:
                history[f"{t}_acc"].append(accs[f"{t}_acc"])
            bar.set_postfix(
                loss=f"{running / count:.3f}", **{t[:4]: f"{accs[f'{t}_acc']:.2f}" for t in TASKS}
            )
            if not progress:
                print(
                    step, f"{running / count:.4f}", {t: round(accs[f"{t}_acc"], 3) for t in TASKS}, flush=True
                )
            running, count = 0.0, 0
    bar.close()
    model.eval()
    training = {
        "steps": int(cfg["steps"]),
        "tokens_seen": int(cfg["steps"]) * int(cfg["batch_size"]) * int(cfg["seq_len"]),
    }
    return FitResult(history=history, training=training)


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config) -> dict[str, Any]:
    """Per-task accuracy (and agreement/IOI logit differences) on ``eval_per_task`` fixed prompts per task."""
    return _all_metrics(model, int(cfg["eval_per_task"]), int(cfg["eval_seed"]))


RECIPE = Recipe(
    name=NAME,
    kind="transformer",
    description=(
        "4-layer decoder (d_model 128, 4 heads, GELU MLP 512, LN) trained on a seeded toy language: "
        "subject-verb agreement across a clause, bracket/quote matching, IOI names, copying."
    ),
    input="word tokens, e.g. model.to_tokens('when Mary and John went to the store , John gave a drink to')",
    config=CONFIG,
    build=build,
    fit=fit,
    evaluate=evaluate,
    fast_overrides=FAST_OVERRIDES,
)

__all__ = [
    "RECIPE",
    "TASKS",
    "WORDS",
    "Episode",
    "other_number",
    "packed_batch",
    "prompt_tokens",
    "task_metrics",
    "task_prompts",
]
