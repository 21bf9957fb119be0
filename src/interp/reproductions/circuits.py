"""Circuit tracing (Ameisen et al. 2025, "Circuit Tracing") on ``zoo:grammar-4l``, checked against interventions.

Attribution graphs (:func:`interp.graphs.attribute`) are computed with the shipped transcoders
``zoo:grammar-4l-tc-l0`` .. ``-l3`` on prompts of the grammar whose mechanism is known, and every
claim the graph makes is tested in the **real** model (:func:`interp.graphs.intervene` splices the
transcoders with their error terms, so an untouched layer computes the model's own MLP output):

* **agreement** -- ``the dog that the cats chase`` -> a singular verb. For each prompt P and its
  twin P' with the subject in the other number (:func:`interp.models.zoo.grammar.other_number`),
  the ``k`` most influential features of P's graph and of P''s graph are steered towards the other
  number: each is set to the activation it has on P' (0 where it is silent there). The verb
  prediction flips (the best verb of the other number outscores the best verb of the subject's
  number) in >= 80% of the prompts (the issue's bound). Control: the same number of features drawn
  at random from those active on P or P', set the same way, flips far fewer (<= 20%).
* **ioi** -- ``when Mary and John went to the store , John gave a drink to`` -> ``Mary``. The pruned
  graph (node 0.8 / edge 0.98) holds a path from the indirect object's token to the answer's logit
  node, and the path leaves the name's position through attention (an edge from the token to a node
  at a later position). Patching along it, clean into a corrupted prompt (the IO name replaced by a
  third name), with the batched patching toolkit (``interp.methods.patching``):

  - the hop: the best single head's value vector at the IO position (``site="head_v_pos"``)
    restores >= 50% of the logit difference logit(IO) - logit(S); the same sweep at the place
    word's position (control) restores <= 20%;
  - the path's features one at a time (``site="sae_latent"``, transcoders spliced with their error
    terms): at least half of them move the logit difference towards clean.

  Measured and reported, not bounded: patching all the path's features together
  (:func:`patch_nodes`) restores only ~10% on the shipped transcoders: most of the name reaches the
  answer through the attention hop and the error nodes, not through features the transcoders hold.
* **graph exactness** (:mod:`interp.graphs.checks`) -- on the same prompts, every target's incoming
  edges plus its bias reconstruct its value (a feature's pre-activation, a logit's demeaned value),
  and on the first graph of each task 40 sampled edges equal a finite-difference intervention in the
  frozen replacement model, both to 1e-4.

Variants: both analyse the shipped checkpoints. ``fast=True`` uses fewer prompts (12 agreement
pairs, 8 IOI prompts) with the same bounds except the agreement flip rate (>= 0.7 on 12 pairs, where
one prompt is 8%) and the IOI value-patch restoration (>= 0.4).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from interp.reproductions._models import zoo_model
from interp.reproductions.report import Check, Report

MODEL = "grammar-4l"
PAPER = "Ameisen et al. 2025"
TOP_K = 60  # features steered per graph (P's and P''s: up to 2 * TOP_K in all; ~10% of the active ones)


# ------------------------------------------------------------------------------------------------
# Model and transcoders
# ------------------------------------------------------------------------------------------------


def load_parts(report: Report | None = None, *, fast: bool = False, given: dict[str, Any] | None = None):
    """``(model, transcoders)``: ``zoo:grammar-4l`` (an interp model with its word vocabulary) and
    its four shipped transcoders, in layer order. ``given`` may hold a ``grammar-4l`` module (tests)."""
    import interp
    from interp import sae as S
    from interp.models.zoo.registry import get_recipe
    from interp.models.zoo.vocab import zoo_vocabulary

    report = report if report is not None else Report("circuits")
    module, meta = zoo_model(MODEL, report, fast=fast, given=given)
    model = interp.load(module, name=f"zoo:{MODEL}")
    model.tokenizer = zoo_vocabulary(MODEL, meta.get("config") or get_recipe(MODEL).resolved_config())
    transcoders = [S.load(f"zoo:{MODEL}-tc-l{layer}") for layer in range(model.cfg.n_layers)]
    return model, transcoders


# ------------------------------------------------------------------------------------------------
# Graph helpers
# ------------------------------------------------------------------------------------------------


def feature_values(graph: Any) -> dict[tuple[int, int, int], float]:
    """``{(layer, pos, feature): activation}`` of every feature node of ``graph``."""
    return {(n.layer, n.pos, n.feature): n.activation for n in graph.nodes if n.kind == "feature"}


def top_features(graph: Any, k: int) -> list[tuple[int, int, int]]:
    """The ``k`` feature nodes of ``graph`` with the largest influence on its logits (``Graph.top_features``)."""
    return [(n.layer, n.pos, n.feature) for n, _ in graph.top_features(k)]


def exactness(model: Any, transcoders: Sequence[Any], graph: Any, n_pairs: int) -> dict[str, float]:
    """The graph's two exactness checks (:mod:`interp.graphs.checks`): the largest gap between an edge
    and a finite-difference intervention in the frozen replacement (over ``n_pairs`` sampled pairs),
    and the largest gap between a target's incoming edges + bias and its value."""
    from interp.graphs.checks import edge_check, reconstruction_check

    edges = edge_check(model, transcoders, graph, n_pairs=n_pairs) if n_pairs else {"max_abs_error": 0.0}
    return {"edge": edges["max_abs_error"], "reconstruction": reconstruction_check(graph)["max_abs_error"]}


def reachable(adjacency: torch.Tensor, start: int, end: int) -> set[int]:
    """Nodes on some path ``start -> ... -> end`` along nonzero ``adjacency[target, source]`` edges."""
    edges = adjacency != 0
    forward, frontier = {start}, [start]
    while frontier:
        nxt = edges[:, frontier].any(dim=1).nonzero().flatten().tolist()
        frontier = [i for i in nxt if i not in forward]
        forward.update(frontier)
    backward, frontier = {end}, [end]
    while frontier:
        nxt = edges[frontier].any(dim=0).nonzero().flatten().tolist()
        frontier = [i for i in nxt if i not in backward]
        backward.update(frontier)
    return forward & backward if end in forward else set()


def verb_margin(logits: torch.Tensor, plural: bool) -> float:
    """Best verb of the subject's number minus best verb of the other number (last position)."""
    from interp.models.zoo.grammar import VERB_IDS

    last = logits[-1]
    return float(last[VERB_IDS[plural]].max() - last[VERB_IDS[not plural]].max())


# ------------------------------------------------------------------------------------------------
# Agreement: steering the graph's top features flips the verb's number
# ------------------------------------------------------------------------------------------------


def agreement_check(
    model: Any, transcoders: Sequence[Any], n: int, *, k: int = TOP_K, seed: int = 0
) -> dict[str, Any]:
    """Flip rates of steering the top-``k`` features (and of a random control) on ``n`` prompt pairs."""
    from interp import graphs
    from interp.models.zoo import grammar

    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    recon = edge = 0.0
    for episode in grammar.task_prompts("agreement", 4 * n, seed=seed):
        if len(rows) == n:
            break
        if episode.info["clause"] == "none":  # keep the prompts with an intervening clause
            continue
        twin = grammar.other_number(episode)
        p, q = (grammar.prompt_tokens([e])[0] for e in (episode, twin))
        gp = graphs.attribute(model, transcoders, p, progress=False)
        gq = graphs.attribute(model, transcoders, q, progress=False)
        checked = exactness(model, transcoders, gp, 40 if not rows else 0)
        recon = max(recon, checked["reconstruction"], exactness(model, transcoders, gq, 0)["reconstruction"])
        edge = max(edge, checked["edge"])
        plural = episode.info["plural"]
        clean = graphs.intervene(model, transcoders, p, [])
        if verb_margin(clean.logits, plural) <= 0:  # the model gets this prompt wrong: nothing to flip
            rows.append({"prompt": " ".join(episode.words[: episode.answer_at]), "skipped": True})
            continue
        values_q = feature_values(gq)
        chosen = list(dict.fromkeys(top_features(gp, k) + top_features(gq, k)))
        steered = graphs.intervene(model, transcoders, p, [(*f, values_q.get(f, 0.0)) for f in chosen])
        pool = [f for f in dict.fromkeys([*feature_values(gp), *values_q]) if f not in chosen]
        pick = torch.randperm(len(pool), generator=gen)[: len(chosen)].tolist()
        control_set = [pool[i] for i in pick]
        control = graphs.intervene(model, transcoders, p, [(*f, values_q.get(f, 0.0)) for f in control_set])
        rows.append(
            {
                "prompt": " ".join(episode.words[: episode.answer_at]),
                "skipped": False,
                "n_steered": len(chosen),
                "margin_clean": verb_margin(clean.logits, plural),
                "margin_steered": verb_margin(steered.logits, plural),
                "margin_control": verb_margin(control.logits, plural),
            }
        )
    scored = [r for r in rows if not r["skipped"]]
    flips = [r["margin_steered"] < 0 for r in scored]
    control_flips = [r["margin_control"] < 0 for r in scored]
    return {
        "rows": rows,
        "n_scored": len(scored),
        "flip_rate": sum(flips) / max(len(scored), 1),
        "control_flip_rate": sum(control_flips) / max(len(scored), 1),
        "max_reconstruction_error": recon,
        "max_edge_error": edge,
    }


# ------------------------------------------------------------------------------------------------
# IOI: the path from the indirect object's token to the answer, and patching along it
# ------------------------------------------------------------------------------------------------


def corrupt_ioi(episode: Any) -> Any:
    """The IOI ``episode`` with its indirect object replaced by a third name (same length)."""
    from interp.models.zoo import grammar

    io, s = episode.info["io"], episode.info["s"]
    third = next(name for name in grammar.NAMES if name not in (io, s))
    words = [third if w == io else w for w in episode.words[: episode.answer_at]] + episode.words[
        episode.answer_at :
    ]
    return grammar.Episode("ioi", words, episode.answer_at, {**episode.info, "corrupt_name": third})


@torch.no_grad()
def patch_nodes(
    model: Any,
    transcoders: Sequence[Any],
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    features: Sequence[tuple[int, int, int]],
    errors: Sequence[tuple[int, int]] = (),
) -> torch.Tensor:
    """Last-position logits of the real model on ``corrupted`` with graph nodes patched from ``clean``.

    The transcoders are spliced with their error terms, so an unpatched layer computes the model's
    own MLP output; each ``(layer, pos, feature)`` takes its clean activation and each error node
    ``(layer, pos)`` its clean error vector (the part of the MLP output the transcoder misses), in one
    forward. Everything downstream (attention, norms, later MLPs) is the real model's response.
    """
    from interp.sae.splicing import latent_hook

    acts_names = [latent_hook(tc) for tc in transcoders]
    error_names = [latent_hook(tc, "hook_sae_error") for tc in transcoders]
    with model.saes(list(transcoders), use_error_term=True):
        _, cache = model.run_with_cache(clean[None], names=acts_names + error_names)

        def setter(name: str, cells: list[tuple[int, ...]]):
            def hook(act: torch.Tensor, ctx: Any) -> torch.Tensor:
                out = act.clone()
                for cell in cells:
                    out[(0, *cell)] = cache[name][(0, *cell)]
                return out

            return hook

        hooks = []
        for layer in range(len(transcoders)):
            cells_f = [(pos, f) for lay, pos, f in features if lay == layer]
            cells_e = [(pos,) for lay, pos in errors if lay == layer]
            if cells_f:
                hooks.append((acts_names[layer], setter(acts_names[layer], cells_f)))
            if cells_e:
                hooks.append((error_names[layer], setter(error_names[layer], cells_e)))
        logits = model.run_with_hooks(corrupted[None], hooks=hooks)
    return logits[0, -1]


def ioi_check(model: Any, transcoders: Sequence[Any], n: int, *, seed: int = 0) -> dict[str, Any]:
    """Path existence and patching restoration on ``n`` IOI prompts (see the module docstring)."""
    from interp import graphs
    from interp.methods import patching as P
    from interp.models.zoo import grammar

    gen = torch.Generator().manual_seed(seed + 1)
    rows: list[dict[str, Any]] = []
    recon = edge = 0.0
    for episode in grammar.task_prompts("ioi", n, seed=seed):
        io, s = grammar.ID[episode.info["io"]], grammar.ID[episode.info["s"]]
        clean_t = grammar.prompt_tokens([episode])[0]
        corrupt_t = grammar.prompt_tokens([corrupt_ioi(episode)])[0]
        io_pos = 1 + episode.words.index(episode.info["io"])  # BOS is position 0
        graph = graphs.attribute(model, transcoders, clean_t, targets=[io, s], progress=False)
        checked = exactness(model, transcoders, graph, 40 if not rows else 0)
        recon, edge = max(recon, checked["reconstruction"]), max(edge, checked["edge"])
        pruned = graph.prune(0.8, 0.98)
        token_node = next(i for i, nd in enumerate(pruned.nodes) if nd.kind == "token" and nd.pos == io_pos)
        logit_node = next(i for i, nd in enumerate(pruned.nodes) if nd.kind == "logit" and nd.feature == io)
        on_path = reachable(pruned.adjacency, token_node, logit_node)
        path = [
            (nd.layer, nd.pos, nd.feature)
            for i, nd in enumerate(pruned.nodes)
            if i in on_path and nd.kind == "feature"
        ]
        errors = [
            (nd.layer, nd.pos) for i, nd in enumerate(pruned.nodes) if i in on_path and nd.kind == "error"
        ]
        clean_values = feature_values(graph)

        def ld(last: torch.Tensor, io: int = io, s: int = s) -> float:
            return float(last[io] - last[s])

        ld_clean = ld(patch_nodes(model, transcoders, clean_t, clean_t, []))
        ld_corrupt = ld(patch_nodes(model, transcoders, clean_t, corrupt_t, []))
        gap = ld_clean - ld_corrupt
        patched = ld(patch_nodes(model, transcoders, clean_t, corrupt_t, path, errors))
        features_only = ld(patch_nodes(model, transcoders, clean_t, corrupt_t, path))
        pool_f = [f for f in clean_values if f not in set(path)]
        pool_e = [(lay, pos) for lay in range(model.cfg.n_layers) for pos in range(len(clean_t))]
        pool_e = [e for e in pool_e if e not in set(errors)]
        rand_f = [pool_f[i] for i in torch.randperm(len(pool_f), generator=gen)[: len(path)].tolist()]
        rand_e = [pool_e[i] for i in torch.randperm(len(pool_e), generator=gen)[: len(errors)].tolist()]
        control = ld(patch_nodes(model, transcoders, clean_t, corrupt_t, rand_f, rand_e))
        singles = (
            _single_patches(model, transcoders, clean_t, corrupt_t, path, P.logit_diff(io, s)) if path else []
        )
        place_pos = 1 + episode.words.index("the") + 1  # the place word: a control position
        hop = _value_patches(model, clean_t, corrupt_t, [io_pos, place_pos], P.logit_diff(io, s))
        hop_in_graph = any(pruned.nodes[i].pos > io_pos for i in on_path if i != token_node)

        def share(value: float, gap: float = gap, base: float = ld_corrupt) -> float:
            return (value - base) / gap if gap > 0 else float("nan")

        rows.append(
            {
                "prompt": " ".join(episode.words[: episode.answer_at]),
                "path_exists": bool(on_path),
                "path_features": len(path),
                "path_errors": len(errors),
                "ld_clean": ld_clean,
                "ld_corrupt": ld_corrupt,
                "restored": share(patched),
                "restored_features_only": share(features_only),
                "restored_control": share(control),
                "single_patch_gains": singles,
                "attention_hop_in_path": hop_in_graph,
                "value_patch_io": hop["best"][0],
                "value_patch_io_head": hop["head"][0],
                "value_patch_control": hop["best"][1],
            }
        )
    usable = [r for r in rows if r["ld_clean"] - r["ld_corrupt"] > 0]
    gains = [g for r in usable for g in r["single_patch_gains"]]
    return {
        "rows": rows,
        "path_rate": sum(r["path_exists"] for r in rows) / max(len(rows), 1),
        "mean_restored": sum(r["restored"] for r in usable) / max(len(usable), 1),
        "mean_restored_control": sum(r["restored_control"] for r in usable) / max(len(usable), 1),
        "mean_restored_features_only": sum(r["restored_features_only"] for r in usable) / max(len(usable), 1),
        "single_positive_share": sum(g > 0 for g in gains) / max(len(gains), 1),
        "hop_rate": sum(r["attention_hop_in_path"] for r in rows) / max(len(rows), 1),
        "mean_value_patch_io": sum(r["value_patch_io"] for r in usable) / max(len(usable), 1),
        "mean_value_patch_control": sum(r["value_patch_control"] for r in usable) / max(len(usable), 1),
        "max_reconstruction_error": recon,
        "max_edge_error": edge,
    }


def _value_patches(model, clean_t, corrupt_t, positions, metric) -> dict[str, list]:
    """One batched ``head_v_pos`` sweep (clean into corrupted) at ``positions``: for each, the best
    single head's restored share of the logit difference and that head's ``(layer, head)``.

    Patching a head's value vector at the indirect object's position patches exactly what that head's
    attention carries out of the name's position: the cross-position hop the graph's path takes."""
    from interp.methods import patching as P

    result = P.patch(
        model, clean_t[None], corrupt_t[None], site="head_v_pos", metric=metric,
        positions=positions, progress=lambda done, total: None,
    )  # fmt: skip
    gap = result.metric_clean - result.metric_corrupted
    share = (result.values - result.metric_corrupted) / gap  # [layer, pos, head]
    best, heads = [], []
    for j in range(len(positions)):
        flat = int(share[:, j].argmax())
        layer, head = divmod(flat, share.shape[2])
        best.append(float(share[layer, j, head]))
        heads.append((layer, head))
    return {"best": best, "head": heads}


def _single_patches(model, transcoders, clean_t, corrupt_t, path, metric) -> list[float]:
    """The logit-difference gain of patching each path feature alone (clean into corrupted), from
    one batched ``sae_latent`` sweep of the patching toolkit over the path's positions and latents."""
    from interp.methods import patching as P

    positions = sorted({pos for _, pos, _ in path})
    latents = sorted({f for _, _, f in path})
    with model.saes(list(transcoders), use_error_term=True):
        result = P.patch(
            model, clean_t[None], corrupt_t[None], site="sae_latent", metric=metric,
            positions=positions, neurons=latents, progress=lambda done, total: None,
        )  # fmt: skip
    gains = []
    for layer, pos, feature in path:
        value = result.values[layer, positions.index(pos), latents.index(feature)]
        gains.append(float(value) - result.metric_corrupted)
    return gains


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def reproduce(fast: bool = False, models: dict[str, Any] | None = None) -> Report:
    """The checks of the module docstring as a :class:`Report` (``models`` replaces grammar-4l, for tests)."""
    report = Report("circuits", fast=fast)
    start = time.perf_counter()
    model, transcoders = load_parts(report, fast=fast, given=models)
    report.timings["load"] = time.perf_counter() - start
    n_agree, n_ioi = (12, 8) if fast else (40, 24)

    start = time.perf_counter()
    agree = agreement_check(model, transcoders, n_agree)
    report.timings["agreement"] = time.perf_counter() - start
    start = time.perf_counter()
    ioi = ioi_check(model, transcoders, n_ioi)
    report.timings["ioi"] = time.perf_counter() - start

    flip_bound, restore_bound = (0.7, 0.4) if fast else (0.8, 0.5)
    scored = agree["n_scored"]
    report.add(
        Check.at_least(
            f"agreement: steering the top features flips the verb's number ({scored} prompts)",
            "causal top features (issue: >= 80%)",
            agree["flip_rate"],
            flip_bound,
        ),
        Check.at_most(
            "agreement: random-feature control flips the verb's number",
            "control: rarely",
            agree["control_flip_rate"],
            0.2,
        ),
        Check.at_least(
            "ioi: pruned graph has a path IO token -> IO logit (share of prompts)",
            "path from the name to the answer",
            ioi["path_rate"],
            0.8 if fast else 0.9,
        ),
        Check.at_least(
            "ioi: the path crosses positions (IO token -> a later-position node, through attention)",
            "the name is moved to the answer",
            ioi["hop_rate"],
            0.8 if fast else 0.9,
        ),
        Check.at_least(
            "ioi: patching that hop (best head's value at the IO position) restores the logit diff",
            "patching along the path restores it",
            ioi["mean_value_patch_io"],
            restore_bound,
        ),
        Check.at_most(
            "ioi: the same patch at the place word's position (control) restores",
            "control: little",
            ioi["mean_value_patch_control"],
            0.2,
        ),
        Check.at_least(
            "ioi: single path features that raise the logit difference (batched sae_latent sweep)",
            "each path node pushes towards clean",
            ioi["single_positive_share"],
            0.5,
        ),
        Check.at_most(
            "graph exactness: max |edge - finite-difference intervention| (frozen replacement)",
            "issue: to 1e-4",
            max(agree["max_edge_error"], ioi["max_edge_error"]),
            1e-4,
        ),
        Check.at_most(
            "graph exactness: max |incoming edges + bias - node value|",
            "issue: reconstructs each target",
            max(agree["max_reconstruction_error"], ioi["max_reconstruction_error"]),
            1e-4,
        ),
    )
    report.notes.append(
        f"Agreement: {n_agree} prompt pairs with an intervening clause; top {TOP_K} features of each twin's graph "
        "steered to the twin's activation. IOI: graphs with targets (IO, S); corrupted prompts replace the IO "
        "name by a third name."
    )
    report.notes.append(
        f"IOI: the path's features patched together restore {ioi['mean_restored']:.2f} of the logit difference "
        f"(random control {ioi['mean_restored_control']:.2f}); most of the name reaches the answer through the "
        "attention hop out of its position and through error nodes (reported, not a check)."
    )
    for r in agree["rows"]:
        if r["skipped"]:
            report.notes.append(f"agreement {r['prompt']!r}: skipped (the model gets it wrong)")
        else:
            report.notes.append(
                f"agreement {r['prompt']!r}: verb margin {r['margin_clean']:.2f} -> steered "
                f"{r['margin_steered']:.2f} ({r['n_steered']} features), control {r['margin_control']:.2f}"
            )
    for r in ioi["rows"]:
        report.notes.append(
            f"ioi {r['prompt']!r}: path {'yes' if r['path_exists'] else 'no'} ({r['path_features']} features); "
            f"logit diff clean {r['ld_clean']:.2f}, corrupted {r['ld_corrupt']:.2f}; value patch at the IO "
            f"position restores {r['value_patch_io']:.2f} (L{r['value_patch_io_head'][0]}H{r['value_patch_io_head'][1]}), "
            f"control {r['value_patch_control']:.2f}; the path's features alone restore {r['restored']:.2f} "
            f"(random control {r['restored_control']:.2f})"
        )
    return report


__all__ = [
    "agreement_check",
    "corrupt_ioi",
    "feature_values",
    "ioi_check",
    "load_parts",
    "reachable",
    "exactness",
    "reproduce",
    "top_features",
]


# ------------------------------------------------------------------------------------------------
# Dashboards: what a transcoder feature reads on grammar text (for the explorer's hover cards)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def top_contexts(
    model: Any, transcoders: Sequence[Any], *, rows: int = 96, k: int = 3, width: int = 6, seed: int = 303
) -> list[dict[int, list[tuple[float, str]]]]:
    """Per layer, ``{feature: [(activation, context), ...]}``: each feature's ``k`` strongest
    activations on ``rows`` seeded grammar sequences, as the ``width`` words up to the token
    (which is bracketed). Features that never fire are absent."""
    from interp.sae.grammar_zoo import grammar_text

    tokens = grammar_text(rows, seed)
    names = [tc.cfg.hook_name for tc in transcoders]
    _, cache = model.run_with_cache(tokens, names=names)
    words = [[model.tokenizer.names[int(t)] for t in row] for row in tokens]
    out: list[dict[int, list[tuple[float, str]]]] = []
    for tc, name in zip(transcoders, names, strict=True):
        acts = tc.encode(cache[name]).reshape(-1, tc.cfg.d_sae)
        values, index = acts.topk(k, dim=0)
        table: dict[int, list[tuple[float, str]]] = {}
        for feature in (values[0] > 0).nonzero().flatten().tolist():
            items = []
            for v, i in zip(values[:, feature].tolist(), index[:, feature].tolist(), strict=True):
                if v <= 0:
                    continue
                r, p = divmod(i, tokens.shape[1])
                context = words[r][max(0, p - width) : p] + [f"[{words[r][p]}]"]
                items.append((v, " ".join(context)))
            table[feature] = items
        out.append(table)
    return out
