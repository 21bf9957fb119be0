"""zoo:grammar-4l: the toy language's ground truth, its metrics, the word vocabulary, the shipped
checkpoint's per-task accuracies, and its transcoders (loaded verified, evaluations reproduced)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import interp
from interp import sae as S
from interp import viz
from interp.errors import InputError
from interp.models import zoo
from interp.models.zoo import grammar as g
from interp.sae import grammar_zoo

PLURAL_WORDS = set(g.NOUNS_PL + g.INTRANS_PL + g.TRANS_PL)
SINGULAR_WORDS = set(g.NOUNS_SG + g.INTRANS_SG + g.TRANS_SG)


def _number(word: str) -> bool:
    assert word in PLURAL_WORDS | SINGULAR_WORDS, word
    return word in PLURAL_WORDS


# ------------------------------------------------------------------------------ the language


def test_agreement_verbs_follow_the_subject_not_the_attractor() -> None:
    clauses = set()
    for e in g.task_prompts("agreement", 300, seed=3):
        subject, verb = e.words[1], e.words[e.answer_at]
        assert _number(subject) == _number(verb) == e.info["plural"]
        clauses.add(e.info["clause"])
        if e.info["clause"] == "that_obj":  # the dog that the cats chase: inner verb agrees with "cats"
            assert _number(e.words[5]) == _number(e.words[4]) == e.info["attractor_plural"]
        if e.info["clause"] == "that_subj":  # the dog that chases the cats: inner verb agrees with "dog"
            assert _number(e.words[3]) == e.info["plural"]
    assert clauses == {"that_obj", "that_subj", "near", "none"}
    assert {e.info["plural"] != e.info["attractor_plural"] for e in g.task_prompts("agreement", 50)} == {
        True,
        False,
    }


def test_other_number_changes_only_the_agreeing_words() -> None:
    for e in g.task_prompts("agreement", 200, seed=4):
        twin = g.other_number(e)
        assert len(twin.words) == len(e.words) and twin.answer_at == e.answer_at
        changed = [i for i, (a, b) in enumerate(zip(e.words, twin.words, strict=True)) if a != b]
        expected = [1, 3, e.answer_at] if e.info["clause"] == "that_subj" else [1, e.answer_at]
        assert changed == expected
        assert all(_number(twin.words[i]) != _number(e.words[i]) for i in changed)
        assert twin.info["plural"] != e.info["plural"]
        assert g.other_number(twin).words == e.words
    with pytest.raises(InputError, match="agreement episode"):
        g.other_number(g.task_prompts("ioi", 1)[0])


def test_brackets_close_the_innermost_open_bracket() -> None:
    opener_of = dict(zip(g.CLOSERS, g.OPENERS, strict=True))
    for e in g.task_prompts("brackets", 300, seed=5):
        stack: list[str] = []
        for i, w in enumerate(e.words[:-1]):
            in_quote = stack and stack[-1] == '"'
            if i == e.answer_at:
                assert opener_of[e.info["expected"]] == stack[-1]
            if w == '"' and in_quote:
                stack.pop()
            elif w in g.OPENERS:
                assert not in_quote, "quotes hold only letters"
                stack.append(w)
            elif w in g.CLOSERS:
                assert stack and stack.pop() == opener_of[w]
        assert not stack and e.words[-1] == "." and e.words[e.answer_at] == e.info["expected"]


def test_ioi_answer_is_the_name_not_repeated() -> None:
    orders = set()
    for e in g.task_prompts("ioi", 200, seed=6):
        prompt = e.words[: e.answer_at]
        io, s = e.info["io"], e.info["s"]
        assert prompt.count(io) == 1 and prompt.count(s) == 2 and e.words[e.answer_at] == io
        orders.add(prompt.index(io) < prompt.index(s))
    assert orders == {True, False}  # both ABBA and BABA


def test_copy_repeats_the_span() -> None:
    for e in g.task_prompts("copy", 100, seed=7):
        k = e.info["k"]
        assert e.words[2 : 2 + k] == e.words[e.answer_at : e.answer_at + k] and 3 <= k <= 8


def test_packed_batches_are_seeded_and_start_with_bos() -> None:
    a = g.packed_batch(g.CONFIG, 4, random.Random(0))
    b = g.packed_batch(g.CONFIG, 4, random.Random(0))
    assert torch.equal(a, b) and a.shape == (4, g.CONFIG["seq_len"])
    assert (a[:, 0] == g.BOS).all() and (a[:, 1:] != g.BOS).all()
    with pytest.raises(InputError, match="unknown grammar task"):
        g.task_prompts("parity", 3)


class _Oracle(torch.nn.Module):
    """Logits that put all mass on a chosen next token: the correct one, or a wrong one."""

    def __init__(self, wrong: bool) -> None:
        super().__init__()
        self.wrong = wrong

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, len(g.WORDS))
        for r, row in enumerate(tokens.tolist()):
            words = [g.WORDS[i] for i in row]
            for p in range(len(row)):
                logits[r, p, g.ID[self.answer(words[: p + 1])]] = 10.0
        return logits

    def answer(self, prefix: list[str]) -> str:
        """The right next word for every scored position of the four tasks (or a wrong one)."""
        body = prefix[1:]
        if len(body) < 2 or (body[0] == "when" and len(body) < 14):
            return "x"  # not a scored position
        if body[0] == "copy":
            bar = body.index("|") if "|" in body else None
            nxt = body[2 + len(body) - bar - 1] if bar is not None and len(body) - bar - 1 < bar - 2 else "x"
            return "x" if self.wrong and nxt != "x" else ("y" if self.wrong else nxt)
        if body[0] == "when":
            io = body[1] if body[9] == body[3] else body[3]
            return body[9] if self.wrong else io
        if body[0] == "the":
            plural = body[1] in g.NOUNS_PL
            return ("runs" if plural else "run") if self.wrong else ("run" if plural else "runs")
        stack = [w for w in body if w in g.OPENERS]  # episodes scored here are open brackets only
        close = g.CLOSERS[g.OPENERS.index(stack[-1])] if stack else ")"
        return ")" if self.wrong and close != ")" else ("]" if self.wrong else close)


@pytest.mark.parametrize("task", g.TASKS)
def test_task_metrics_score_an_oracle_1_and_a_wrong_oracle_0(task: str) -> None:
    episodes = g.task_prompts(task, 30, seed=8)
    if task == "brackets":  # the oracle reads openers only: keep prompts without a closer yet
        episodes = [e for e in episodes if not set(e.words[: e.answer_at]) & set(g.CLOSERS[:3])]
        episodes = [e for e in episodes if '"' not in e.words[: e.answer_at]]
    assert episodes
    right = g.task_metrics(_Oracle(False), task, episodes)
    wrong = g.task_metrics(_Oracle(True), task, episodes)
    assert right[f"{task}_acc"] == 1.0 and wrong[f"{task}_acc"] == 0.0
    if task in ("agreement", "ioi"):
        assert right[f"{task}_logit_diff"] == pytest.approx(10.0)
        assert wrong[f"{task}_logit_diff"] == pytest.approx(-10.0)


# ------------------------------------------------------------------------------ the shipped model


@pytest.fixture(scope="module")
def model() -> interp.HookedModel:
    return interp.load("zoo:grammar-4l")


def test_shipped_model_learned_every_task() -> None:
    _, meta = zoo.load_zoo("grammar-4l")
    metrics = meta["metrics"]
    for task in g.TASKS:
        assert metrics[f"{task}_acc"] >= 0.9, (task, metrics)
    assert metrics["ioi_logit_diff"] > 2 and metrics["agreement_logit_diff"] > 2
    assert meta["training"]["cpu_time_s"] < 60 * 60  # the issue's budget
    assert meta["config"]["d_mlp"] == 512 and meta["config"]["normalization_type"] == "LN"


def test_word_vocabulary_reads_and_writes_words(model) -> None:
    prompt = g.SAMPLES[0]
    assert model.to_str_tokens(prompt) == ["BOS", *prompt.split()]
    tokens = model.to_tokens(prompt)
    assert tokens[0, 0].item() == g.BOS and tokens.shape == (1, 1 + len(prompt.split()))
    assert model.tokenizer.decode(tokens[0, 1:]) == prompt
    with pytest.raises(InputError, match="'Mary,' is not a word of this model"):
        model.to_tokens("when Mary, and John")
    assert viz.sample_text(model, seed=1) == g.SAMPLES[1]


def test_ioi_prompt_from_the_issue(model) -> None:
    logits = model(g.SAMPLES[0])
    assert model.tokenizer.names[int(logits[0, -1].argmax())] == "Mary"


# ------------------------------------------------------------------------------ transcoders


@pytest.mark.parametrize("layer", range(4))
def test_shipped_transcoder_reproduces_its_recorded_evaluation(model, layer: int) -> None:
    tc = S.load(f"zoo:grammar-4l-tc-l{layer}")
    c = tc.cfg
    assert c.architecture == "transcoder" and c.d_in == 128
    assert c.hook_name == f"blocks.{layer}.mlp.hook_in" and c.hook_name_out == f"blocks.{layer}.hook_mlp_out"
    assert c.hook_name in model.hook_names and c.hook_name_out in model.hook_names
    recorded = c.metadata["evaluation"]["metrics"]
    recipe = c.metadata["training"]["recipe"]
    tokens = grammar_zoo.grammar_text(recipe["eval_sequences"], recipe["eval_data_seed"])
    got = S.evaluate(model, tc, tokens, batch_size=50, model_metrics=False)
    for key in ("explained_variance", "mse", "l0"):
        assert got[key] == pytest.approx(recorded[key], rel=1e-4, abs=1e-6), key
    assert recorded["explained_variance"] >= 0.7 and recorded["l0"] <= 64


def test_transcoder_folders_hold_only_verified_safetensors() -> None:
    from interp.sae.io import ZOO_DIR

    for name in grammar_zoo.names():
        folder = Path(ZOO_DIR) / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "cfg.json",
            "sae_weights.safetensors",
            "sae_weights.safetensors.sha256",
        ]
        assert (folder / "sae_weights.safetensors").stat().st_size < 2_000_000


@pytest.mark.slow
def test_fast_grammar_training_runs_and_records_metrics(tmp_path: Path) -> None:
    meta = zoo.train("grammar-4l", tmp_path, fast=True, progress=False)
    assert set(meta["metrics"]) >= {f"{t}_acc" for t in g.TASKS}
    losses = meta["history"]["loss"]
    assert losses[-1] < losses[0]
    model, _ = zoo.load_zoo("grammar-4l", directory=tmp_path)
    assert zoo.evaluate("grammar-4l", model, fast=True) == pytest.approx(meta["metrics"], rel=1e-4)
