"""Activation-patching speed: interp's batched sweeps vs TransformerLens 4.3's ``patching`` (one
forward per patch), same metric, same weights, timed side by side (interleaved rounds).

Workloads:
  * induction-2l (the zoo checkpoint if shipped, else a random-init boot_native model of the same
    architecture: 2 layers, attention only, d_model 64, 4 heads), repeated-token pairs
    [BOS, r, r] vs [BOS, s, r], metric = mean log-prob of the second copy:
    per-head-by-position sweep (goal >= 10x faster) and residual-stream sweep;
    attribution patching vs exact patching (time ratio and correlation).
  * MiniLM (all-MiniLM-L6-v2, BERT): cosine similarity of the mean-pooled embedding to the clean
    run's; residual-stream sweep and per-head-by-position sweep (layers 0 and 5, through TL's
    ``index_df``). The TL metric reads the same final hidden state through a hook.

  * per-head q/k/v/pattern by-position sweeps on both (goal >= 10x faster than TL's
    get_act_patch_attn_head_{q,k,v,pattern}_by_pos); the all-position and ``patch_every`` sweeps are
    checked against TL once (not timed).

Before timing, each pair of results is checked: max |interp - TL| must be <= 1e-5. interp runs the
model once up to each patched hook (``HookedModel.run_copies``) and, on causal models, only the
positions from the first patched one on (``interp.models.suffix``, whose forwards also run unhooked
LayerNorms and attention as single kernels, and the bridge's forward as plain torch ops around the
hooked components), and patches in the last block only each copy's
position after the patch (none at all where the metric does not read that position; earlier
patches run the last block's queries at the read positions only, and a logit difference on an HF
model computes two logit columns); the same sweeps with the copies tiled at the input, and with whole
sequences (neither reuse), are timed beside them to show what each buys. On a shared machine use
``--clock cpu`` and 5+ rounds: wall-clock ratios move by 30% there.
Ratios are the median of per-round ratios, with their spread (min-max) over rounds.

  * GPT-2 small architecture (random init; opt in with --gpt2-small ROUNDS): the issue's IOI-sized
    case, 1 x 15 tokens, logit difference; per-head-by-position sweep over layers 0, 6 and 11 by
    default (540 TL forwards; --gpt2-layers all: 2,160) and the residual sweep.

    python benchmarks/bench_patching.py [--rounds 3] [--minilm-rounds 1] [--gpt2-small 1] [--gpt2-layers all] [--clock cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import machine

import interp
from interp.methods import attribution_patching as atp
from interp.methods import patching as P
from interp.methods.induction_patching import repeated_tokens_pair, second_half_logprob

TOLERANCE = 1e-5
HEAD_VECTORS = ("q", "k", "v")


def induction_model():
    from interp.models import zoo

    if any(e["name"] == "induction-2l" and e["has_checkpoint"] for e in zoo.describe()):
        return interp.load("zoo:induction-2l"), "zoo:induction-2l (trained)"
    module = zoo.build("induction-2l")
    return interp.load(
        module.eval(), name="induction-2l-untrained"
    ), "induction-2l architecture, random init (no checkpoint yet)"


CLOCK = time.perf_counter  # --clock cpu: this process's CPU time (one thread), steadier on a shared machine


def interleaved_rounds(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, every round, in alternating order (no warm-up: each was
    called once by the agreement checks)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = CLOCK()
            runs[name]()
            times[name].append(CLOCK() - start)
    return times


def report(
    title: str, times: dict[str, list[float]], ratios: list[tuple[str, str, str, float | None]]
) -> bool:
    """Median times, then each ``(label, numerator, denominator, goal)`` as the median of per-round
    ratios with its min-max spread; a goal (at most) of None is informational. True if all met."""
    print(f"\n## {title}")
    for name, ts in times.items():
        print(f"  {name:<52} {statistics.median(ts) * 1e3:9.1f} ms")
    ok = True
    for label, num, den, goal in ratios:
        per_round = [a / b for a, b in zip(times[num], times[den], strict=True)]
        ratio = statistics.median(per_round)
        spread = f"[{min(per_round):.3f}-{max(per_round):.3f}]"
        verdict = (
            "informational" if goal is None else f"goal <= {goal}x: {'met' if ratio <= goal else 'MISSED'}"
        )
        ok &= goal is None or ratio <= goal
        print(f"  {label:<52} {ratio:6.3f}x {spread}  ({verdict})")
    return ok


def whole_sequences(run):
    """``run()`` with the reuse along the sequence axis switched off (every forward runs every position)."""
    groups, P.PREFIX_GROUPS = P.PREFIX_GROUPS, 1
    try:
        return run()
    finally:
        P.PREFIX_GROUPS = groups


def without_shared_prefix(model, run):
    """``run()`` with every tiling plan switched off: each forward tiles its copies at the input."""
    model.tiling_plans = lambda name: []
    try:
        return run()
    finally:
        del model.tiling_plans


def head_and_resid_sweeps(model, bridge, clean, corrupted, metric, tl_metric, clean_cache) -> dict:
    """interp's and TL's per-head-by-position (output, q, k, v, pattern) and residual sweeps."""
    import transformer_lens.patching as tlp

    runs = {
        "interp head_pos": lambda: P.patch(model, clean, corrupted, "head_pos", metric),
        "TL get_act_patch_attn_head_out_by_pos": lambda: tlp.get_act_patch_attn_head_out_by_pos(
            bridge, corrupted, clean_cache, tl_metric
        ),
        "interp resid_pre": lambda: P.patch(model, clean, corrupted, "resid_pre", metric),
        "TL get_act_patch_resid_pre": lambda: tlp.get_act_patch_resid_pre(
            bridge, corrupted, clean_cache, tl_metric
        ),
    }
    for what in (*HEAD_VECTORS, "pattern"):
        tl_fn = getattr(tlp, f"get_act_patch_attn_head_{what}_by_pos")
        runs[f"interp head_{what}_pos"] = lambda what=what: P.patch(
            model, clean, corrupted, f"head_{what}_pos", metric
        )
        runs[f"TL get_act_patch_attn_head_{what}_by_pos"] = lambda tl_fn=tl_fn: tl_fn(
            bridge, corrupted, clean_cache, tl_metric
        )
    return runs


def check_sweeps(runs: dict) -> bool:
    ok = check("head_pos", runs["interp head_pos"]().values, runs["TL get_act_patch_attn_head_out_by_pos"]())
    ok &= check("resid_pre", runs["interp resid_pre"]().values, runs["TL get_act_patch_resid_pre"]())
    for what in (*HEAD_VECTORS, "pattern"):
        ours, ref = runs[f"interp head_{what}_pos"](), runs[f"TL get_act_patch_attn_head_{what}_by_pos"]()
        ok &= check(f"head_{what}_pos", ours.values, ref)
    return ok


def check_untimed(model, bridge, clean, corrupted, metric, tl_metric, clean_cache) -> bool:
    """The all-position per-head sweeps and patch_every against TL, once (they are few forwards)."""
    import transformer_lens.patching as tlp

    ok = True
    for what in (*HEAD_VECTORS, "pattern"):
        ref = getattr(tlp, f"get_act_patch_attn_head_{what}_all_pos")(
            bridge, corrupted, clean_cache, tl_metric
        )
        ok &= check(
            f"head_{what} (all positions)",
            P.patch(model, clean, corrupted, f"head_{what}", metric).values,
            ref,
        )
    for family, tl_fn in (
        ("head", tlp.get_act_patch_attn_head_all_pos_every),
        ("head_pos", tlp.get_act_patch_attn_head_by_pos_every),
    ):
        ours = P.patch_every(model, clean, corrupted, family, metric)
        ok &= check(f"patch_every {family!r}", ours.values, tl_fn(bridge, corrupted, clean_cache, tl_metric))
    return ok


def head_ratios(prefix: str = "") -> list[tuple[str, str, str, float | None]]:
    return [
        (
            f"head_{what}_pos: interp / TL",
            f"interp head_{what}_pos{prefix}",
            f"TL get_act_patch_attn_head_{what}_by_pos",
            0.1,
        )
        for what in (*HEAD_VECTORS, "pattern")
    ]


def check(label: str, ours: torch.Tensor, ref: torch.Tensor) -> bool:
    diff = (ours.flatten() - ref.flatten()).abs().max().item()
    ok = diff <= TOLERANCE
    print(f"  {label:<44} max |interp - TL| = {diff:.2e}  ({'ok' if ok else 'MISMATCH'})")
    return ok


def toy_workload(rounds: int) -> bool:
    model, what = induction_model()
    bridge = model.module.eval()
    clean, corrupted = repeated_tokens_pair(model, half_len=10, batch=4, seed=0)
    metric = second_half_logprob(clean)
    _, clean_cache = bridge.run_with_cache(clean)
    n_layers, n_heads, n_pos = model.n_layers, model.cfg.n_heads, clean.shape[1]
    print(f"\n# {what}: batch 4 x {n_pos} tokens; TL: {n_layers * n_pos * n_heads} forwards per head sweep")

    def head_pos():
        return P.patch(model, clean, corrupted, "head_pos", metric)

    runs = {
        **head_and_resid_sweeps(model, bridge, clean, corrupted, metric, metric, clean_cache),
        "interp AtP head_pos": lambda: atp.attribution_patch(model, clean, corrupted, "head_pos", metric),
        "interp head_pos, whole sequences": lambda: whole_sequences(head_pos),
        "interp head_pos, copies tiled at the input": lambda: whole_sequences(
            lambda: without_shared_prefix(model, head_pos)
        ),
    }
    ok = check_sweeps(runs) & check_untimed(model, bridge, clean, corrupted, metric, metric, clean_cache)
    exact = runs["interp head_pos"]()
    estimate = atp.with_agreement(runs["interp AtP head_pos"](), exact)
    print(f"  AtP vs exact head_pos: Pearson r = {estimate.agreement:.4f}")
    times = interleaved_rounds(runs, rounds)
    tl_head = "TL get_act_patch_attn_head_out_by_pos"
    return ok & report(
        "induction-2l sweeps",
        times,
        [
            ("head_pos: interp / TL", "interp head_pos", tl_head, 0.067),
            *head_ratios(),
            ("resid_pre: interp / TL", "interp resid_pre", "TL get_act_patch_resid_pre", 0.5),
            ("head_pos, whole sequences / TL", "interp head_pos, whole sequences", tl_head, None),
            (
                "head_pos, copies tiled at the input / TL",
                "interp head_pos, copies tiled at the input",
                tl_head,
                None,
            ),
            ("AtP head_pos / TL exact", "interp AtP head_pos", tl_head, None),
        ],
    )


def minilm_workload(rounds: int) -> bool:
    """MiniLM is bidirectional, so no reuse along the sequence axis: every forward runs every position."""
    import pandas as pd
    import transformer_lens.patching as tlp

    model = interp.load("minilm")
    bridge = model.to_bridge()
    clean, corrupted = "The cat sat on the mat.", "The dog slept on the rug."
    clean_t, corrupt_t = P.check_pair(model, clean, corrupted)
    n_pos = clean_t.input_ids.shape[1]
    metric = P.cosine().bind(model(clean_t), model(corrupt_t), None)
    final = f"blocks.{model.n_layers - 1}.hook_out"
    hidden: dict[str, torch.Tensor] = {}
    bridge.add_hook(final, lambda act, hook: hidden.__setitem__("h", act))

    def tl_metric(_logits: torch.Tensor) -> torch.Tensor:  # same cosine, on BERT's last hidden state
        return metric(hidden["h"])

    _, clean_cache = bridge.run_with_cache(clean_t.input_ids)
    layers = [0, model.n_layers - 1]
    rows = [
        (layer, pos, head) for layer in layers for pos in range(n_pos) for head in range(model.cfg.n_heads)
    ]
    index_df = pd.DataFrame(rows, columns=["layer", "pos", "head"])
    pattern_df = pd.DataFrame(
        [(layer, head, pos) for layer, pos, head in rows], columns=["layer", "head_index", "dest_pos"]
    )
    print(
        f"\n# MiniLM: 1 x {n_pos} tokens, cosine of the mean-pooled embedding; TL head sweep: {len(rows)} forwards"
    )

    def tl_sweep(what: str, df):
        fn = getattr(tlp, f"get_act_patch_attn_head_{what}_by_pos")
        return lambda: fn(
            bridge, corrupt_t.input_ids, clean_cache, tl_metric, index_axis_names=None, index_df=df
        )

    def ours(site: str):
        return lambda: P.patch(model, clean_t, corrupt_t, site, metric, layers=layers)

    runs = {
        "interp resid_pre": lambda: P.patch(model, clean_t, corrupt_t, "resid_pre", metric),
        "TL get_act_patch_resid_pre": lambda: tlp.get_act_patch_resid_pre(
            bridge, corrupt_t.input_ids, clean_cache, tl_metric
        ),
        "interp head_pos (layers 0, 5)": ours("head_pos"),
        "TL head_out_by_pos (layers 0, 5)": tl_sweep("out", index_df),
    }
    for what in (*HEAD_VECTORS, "pattern"):
        runs[f"interp head_{what}_pos (layers 0, 5)"] = ours(f"head_{what}_pos")
        runs[f"TL head_{what}_by_pos (layers 0, 5)"] = tl_sweep(
            what, pattern_df if what == "pattern" else index_df
        )
    ok = check("resid_pre", runs["interp resid_pre"]().values, runs["TL get_act_patch_resid_pre"]())
    for what in ("out", *HEAD_VECTORS):
        site = "head_pos" if what == "out" else f"head_{what}_pos"
        ok &= check(
            f"{site} (layers 0, 5)",
            runs[f"interp {site} (layers 0, 5)"]().values,
            runs[f"TL head_{what}_by_pos (layers 0, 5)"](),
        )
    runs["interp head_pattern_pos (layers 0, 5)"]()
    print("  head_pattern_pos: not compared (TL 4.3 discards pattern edits on HF-delegated attention; tests/")
    print(
        "    test_patching_sites.py checks it against one-forward hooks), timed for the same 2 x pos x head forwards"
    )
    times = interleaved_rounds(runs, rounds)
    return ok & report(
        "MiniLM sweeps",
        times,
        [
            ("resid_pre: interp / TL", "interp resid_pre", "TL get_act_patch_resid_pre", 0.5),
            (
                "head_pos: interp / TL",
                "interp head_pos (layers 0, 5)",
                "TL head_out_by_pos (layers 0, 5)",
                0.1,
            ),
            *[
                (
                    f"head_{what}_pos: interp / TL",
                    f"interp head_{what}_pos (layers 0, 5)",
                    f"TL head_{what}_by_pos (layers 0, 5)",
                    0.1,
                )
                for what in (*HEAD_VECTORS, "pattern")
            ],
        ],
    )


# first, middle and last block: their mean count of later blocks is the model's (6.3 vs 6.5)
GPT2_LAYERS = (0, 6, 11)


def gpt2_small_workload(rounds: int, layers: tuple[int, ...] | None = GPT2_LAYERS) -> bool:
    """The issue's motivating case: a per-head-by-position sweep on an IOI-length prompt in GPT-2 small
    (12 layers x 12 heads x 15 positions = 2,160 TL forwards of ~0.15 s CPU each: ~6 min of TL per round).
    By default the head sweeps cover ``GPT2_LAYERS`` only (TL through ``index_df``, the same cells;
    540 forwards): ~2 min of CPU per round and as much for the agreement checks (26 min of wall time on a
    busy 2-core box); ``--gpt2-layers all`` sweeps every layer. No hub
    weights here, so the model is a random-init GPT-2 small written with save_pretrained to a
    temporary directory: the timing and the agreement check do not depend on the weights."""
    import tempfile

    import pandas as pd
    import transformer_lens.patching as tlp
    from transformers import GPT2Config, GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(directory)
        model = interp.load(directory)
        bridge = model.to_bridge()
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50257, (1, 15), generator=generator)
    corrupted = clean.clone()
    corrupted[0, [2, 4]] = corrupted[0, [4, 2]]  # swap the two names, IOI-style
    correct, wrong = int(clean[0, 2]), int(clean[0, 4])
    metric = P.logit_diff(correct, wrong)

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, correct] - logits[0, -1, wrong]

    _, clean_cache = bridge.run_with_cache(clean)
    n_layers, n_heads, n_pos = model.n_layers, model.cfg.n_heads, clean.shape[1]
    chosen = list(range(n_layers)) if layers is None else list(layers)
    rows = [(layer, pos, head) for layer in chosen for pos in range(n_pos) for head in range(n_heads)]
    index_df = pd.DataFrame(rows, columns=["layer", "pos", "head"])
    print(
        f"\n# GPT-2 small architecture (random init): 1 x {n_pos} tokens; head sweeps over layers {chosen} "
        f"of {n_layers} ({len(rows)} TL forwards); {rounds} round(s)"
    )

    def head_pos():
        return P.patch(model, clean, corrupted, "head_pos", metric, layers=chosen)

    runs = {
        "interp head_pos": head_pos,
        "TL get_act_patch_attn_head_out_by_pos": lambda: tlp.get_act_patch_attn_head_out_by_pos(
            bridge, corrupted, clean_cache, tl_metric, index_axis_names=None, index_df=index_df
        ),
        "interp head_pos, whole sequences": lambda: whole_sequences(head_pos),
        "interp resid_pre": lambda: P.patch(model, clean, corrupted, "resid_pre", metric),
        "TL get_act_patch_resid_pre": lambda: tlp.get_act_patch_resid_pre(
            bridge, corrupted, clean_cache, tl_metric
        ),
    }
    ok = check("head_pos", runs["interp head_pos"]().values, runs["TL get_act_patch_attn_head_out_by_pos"]())
    ok &= check("resid_pre", runs["interp resid_pre"]().values, runs["TL get_act_patch_resid_pre"]())
    times = interleaved_rounds(runs, rounds)
    tl_head = "TL get_act_patch_attn_head_out_by_pos"
    return ok & report(
        f"GPT-2 small sweeps (head sweeps: layers {chosen})",
        times,
        [
            ("head_pos: interp / TL", "interp head_pos", tl_head, 0.1),
            ("head_pos, whole sequences / TL", "interp head_pos, whole sequences", tl_head, None),
            ("resid_pre: interp / TL", "interp resid_pre", "TL get_act_patch_resid_pre", 0.5),
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--minilm-rounds", type=int, default=1)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-toy", action="store_true", help="skip the induction-2l workload")
    parser.add_argument(
        "--gpt2-small", type=int, default=0, metavar="ROUNDS",
        help="also time the IOI-sized sweep on a random-init GPT-2 small (~2 min CPU a round, as much for checks)",
    )  # fmt: skip
    parser.add_argument(
        "--gpt2-layers", default=",".join(map(str, GPT2_LAYERS)), metavar="L,L,...|all",
        help=f"layers of the GPT-2 small head sweeps (default {GPT2_LAYERS}; 'all': 2,160 TL forwards a round)",
    )  # fmt: skip
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall-clock time (default) or this process's CPU time, which a busy machine disturbs less",
    )  # fmt: skip
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"machine: {machine()}; clock: {args.clock}")
    start = time.perf_counter()
    ok = True if args.skip_toy else toy_workload(args.rounds)
    if not args.skip_minilm:
        ok &= minilm_workload(args.minilm_rounds)
    if args.gpt2_small:
        layers = None if args.gpt2_layers == "all" else tuple(int(x) for x in args.gpt2_layers.split(","))
        ok &= gpt2_small_workload(args.gpt2_small, layers)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; all goals and agreement checks met: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
