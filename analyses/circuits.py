"""Circuit tracing (Ameisen et al. 2025) on zoo:grammar-4l: a walk through one graph, then the checks.

The walk uses the public API only: load the model and its transcoders, compute the attribution
graph of an agreement prompt, prune it, read its top features, steer them in the real model, and
follow the IOI path from the name to the answer. Then it runs ``interp reproduce circuits`` and
prints the table (quantity / paper / ours / tolerance / pass). Exits 1 if any check misses.

    python analyses/circuits.py            # faithful: the shipped checkpoints, 40 + 24 prompts
    python analyses/circuits.py --fast     # fewer prompts, looser stated bounds
    python analyses/circuits.py --walk     # the walk only
"""

from __future__ import annotations

import argparse
import sys

import interp.reproductions
from interp import graphs
from interp import sae as S
from interp.models.zoo import grammar
from interp.reproductions import circuits


def walk() -> None:
    """One agreement graph and one IOI graph, read and checked by hand."""
    model = interp.load("zoo:grammar-4l")
    transcoders = [S.load(f"zoo:grammar-4l-tc-l{layer}") for layer in range(model.cfg.n_layers)]

    # 1. Agreement: "the dog that the cats chase" -> a singular verb, whatever the attractor "cats" says.
    prompt = "the dog that the cats chase"
    graph = graphs.attribute(model, transcoders, prompt, progress=False)
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    top = model.tokenizer.names[graph.logit_tokens[0]]
    print(f"{prompt!r} -> {top!r} (p = {float(graph.logit_probs[0]):.2f}); {graph} -> pruned {pruned}")
    print(f"replacement score {graph.replacement_score():.3f}, completeness {graph.completeness_score():.3f}")
    features = circuits.top_features(graph, circuits.TOP_K)  # the reproduction's k (60)
    for layer, pos, feature in features[:6]:
        effects = S.logit_effects(model, transcoders[layer], feature, k=4)
        word = graph.prompt_str_tokens[pos]
        print(f"  L{layer} F{feature} at {word!r}: promotes {effects.top_tokens}")

    # Steer them, and the twin graph's top features, to their values on the twin prompt with a
    # plural subject (0 where silent there), as the reproduction does.
    twin = "the dogs that the cats chase"
    twin_graph = graphs.attribute(model, transcoders, twin, progress=False)
    values = circuits.feature_values(twin_graph)
    chosen = list(dict.fromkeys(features + circuits.top_features(twin_graph, circuits.TOP_K)))
    edit = [(*f, values.get(f, 0.0)) for f in chosen]
    result = graphs.intervene(model, transcoders, prompt, edit)
    before, after = (model.tokenizer.names[int(x[-1].argmax())] for x in (result.clean_logits, result.logits))
    print(f"  steering those {len(edit)} features towards plural: top verb {before!r} -> {after!r}")

    # 2. IOI: the path from the indirect object's token to the answer's logit.
    episode = grammar.task_prompts("ioi", 1, seed=5)[0]
    tokens = grammar.prompt_tokens([episode])[0]
    io, s = (grammar.ID[episode.info[k]] for k in ("io", "s"))
    graph = graphs.attribute(model, transcoders, tokens, targets=[io, s], progress=False)
    pruned = graph.prune()
    io_pos = 1 + episode.words.index(episode.info["io"])
    start = next(i for i, n in enumerate(pruned.nodes) if n.kind == "token" and n.pos == io_pos)
    end = next(i for i, n in enumerate(pruned.nodes) if n.kind == "logit" and n.feature == io)
    path = sorted(circuits.reachable(pruned.adjacency, start, end))
    print(" ".join(episode.words[: episode.answer_at]), "->", episode.info["io"])
    names = [f"{n.kind} {n.label}" if n.kind in ("token", "logit") else n.label for n in pruned.nodes]
    print("  path IO token -> answer:", ", ".join(names[i] for i in path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer prompts, looser stated bounds")
    parser.add_argument("--walk", action="store_true", help="only the walk through one graph")
    parser.add_argument("--out", default=None, help="report directory")
    args = parser.parse_args(argv)
    walk()
    if args.walk:
        return 0
    report = interp.reproductions.run("circuits", fast=args.fast, out_dir=args.out)
    for check in report.failures:
        print(f"MISS: {check.quantity}: ours {check.ours}, wanted {check.tolerance} (paper: {check.paper})")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
