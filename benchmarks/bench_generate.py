"""Generation speed: interp's ``generate`` vs Hugging Face ``generate`` with a KV cache.

Workload: a GPT-2-architecture transformer (random init, 4 layers, d_model 256, 8 heads, vocab
2048, saved with save_pretrained in a temp dir), greedy decoding of 64 new tokens (no EOS stop) from
a 16-token prompt, at batch 1 and at batch 8 (left-padded prompts of 8 to 16 tokens, masked).

Side by side in one run, interleaved rounds, one thread:
  * interp ``model.generate`` vs HF ``model.generate`` (both with the KV cache)   goal >= 0.9x tokens/s
  * for reference: TransformerLens 4.3's bridge ``generate`` (no goal)

Before timing it checks that interp's and HF's outputs are the same tokens.

Second table, native (``boot_native``) zoo bridges (zoo:induction-2l, zoo:grammar-4l): interp's KV
cache (``interp.models.kvcache``) vs the same ``generate`` recomputing the sequence each step
(``use_past_kv_cache=False``), and TransformerLens's bridge ``generate`` (which keeps no cache on
native models), greedy, 16-token prompts, as many new tokens as the context allows (up to --new),
batch 1 and batch 8 left-padded. No goal; it checks that all three give the same tokens.

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py [--rounds 9] [--new 64] [--clock cpu]

``--clock cpu`` times this process's CPU time (one thread), which a busy machine disturbs less than
wall-clock time (the default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
from common import machine

import interp

VOCAB = 2048


def toy_gpt2_dir() -> str:
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    directory = tempfile.mkdtemp(prefix="toy-gpt2-gen-")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=256, n_embd=256, n_layer=4, n_head=8, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        unk_token="t0",
        eos_token="t0",
        pad_token="t0",
    )
    fast.save_pretrained(directory)
    return directory


def prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-padded prompt ids and mask (None for one prompt)."""
    gen = torch.Generator().manual_seed(batch)
    if batch == 1:
        return torch.randint(1, VOCAB, (1, 16), generator=gen), None
    lengths = torch.randint(8, 17, (batch,), generator=gen)
    ids = torch.zeros(batch, 16, dtype=torch.long)
    mask = torch.zeros(batch, 16, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 16 - n :] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[row, 16 - n :] = 1
    return ids, mask


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def timed_rounds(contenders: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, alternating the order each round (after one warm-up)."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = CLOCK()
            contenders[name]()
            times[name].append(CLOCK() - start)
    return times


def workload(source: str, batch: int, new: int, rounds: int) -> bool:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2LMHeadModel

    ours = interp.load(source)
    hf = GPT2LMHeadModel.from_pretrained(source).eval()
    bridge = TransformerBridge.boot_transformers(source, device="cpu").eval()
    ids, mask = prompts(batch)
    hf_mask = torch.ones_like(ids) if mask is None else mask

    def run_ours() -> torch.Tensor:
        return ours.generate(ids, new, do_sample=False, stop_at_eos=False, attention_mask=mask)

    def run_hf() -> torch.Tensor:
        with torch.no_grad():
            return hf.generate(
                input_ids=ids, attention_mask=hf_mask, max_new_tokens=new, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip

    def run_bridge() -> torch.Tensor:
        return bridge.generate(
            ids, new, do_sample=False, stop_at_eos=False, verbose=False, attention_mask=mask
        )

    same = torch.equal(run_ours(), run_hf())
    times = timed_rounds({"interp": run_ours, "hf": run_hf, "tl_bridge": run_bridge}, rounds)
    tokens = batch * new
    print(
        f"\n## batch {batch}, {ids.shape[1]}-token prompts, {new} new tokens (greedy); same tokens as HF: {same}"
    )
    print_times(times, tokens)
    ratio, per_round = speedup(times, slow="hf", fast="interp")
    met = ratio >= 0.9
    print(
        f"  interp tokens/s / HF tokens/s: {ratio:.3f}x (per round {per_round[0]:.2f}..{per_round[-1]:.2f}; "
        f"goal >= 0.9x: {'met' if met else 'MISSED'})"
    )
    return met and same


def print_times(times: dict[str, list[float]], tokens: int) -> None:
    """One line per contender: median time, tokens/s and the spread over rounds."""
    for name, ts in times.items():
        med = statistics.median(ts)
        spread = (max(ts) - min(ts)) / med
        print(
            f"  {name:<12} {med * 1e3:8.1f} ms  {tokens / med:8.0f} tokens/s  (spread {spread:.0%} of the median)"
        )


def speedup(times: dict[str, list[float]], slow: str, fast: str) -> tuple[float, list[float]]:
    """Tokens/s of ``fast`` over ``slow``: the ratio of medians and the sorted per-round ratios."""
    ratio = statistics.median(times[slow]) / statistics.median(times[fast])
    return ratio, sorted(s / f for s, f in zip(times[slow], times[fast], strict=True))


def native_workload(name: str, batch: int, new: int, rounds: int) -> bool:
    """Cached vs recomputing generation on a zoo bridge; True when all three agree on the tokens."""
    model = interp.load(name)
    new = min(new, model.n_ctx - 16)
    ids, mask = prompts(batch)
    ids = ids % model.d_vocab

    def cached() -> torch.Tensor:
        return model.generate(ids, new, do_sample=False, stop_at_eos=False, attention_mask=mask)

    def recompute() -> torch.Tensor:
        return model.generate(
            ids, new, do_sample=False, stop_at_eos=False, attention_mask=mask, use_past_kv_cache=False
        )

    def tl_bridge() -> torch.Tensor:
        return model.bridge.generate(
            ids, new, do_sample=False, stop_at_eos=False, verbose=False, attention_mask=mask
        )

    same = torch.equal(cached(), recompute()) and torch.equal(cached(), tl_bridge())
    times = timed_rounds({"kv_cache": cached, "recompute": recompute, "tl_bridge": tl_bridge}, rounds)
    tokens = batch * new
    print(
        f"\n## {name}, batch {batch}, {new} new tokens (greedy); same tokens (cache, recompute, TL): {same}"
    )
    print_times(times, tokens)
    ratio, per_round = speedup(times, slow="recompute", fast="kv_cache")
    print(
        f"  cache tokens/s / recompute tokens/s: {ratio:.2f}x (per round {per_round[0]:.2f}..{per_round[-1]:.2f})"
    )
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    print(f"# bench_generate ({machine()}; clock: {args.clock})")
    source = toy_gpt2_dir()
    ok = all([workload(source, batch, args.new, args.rounds) for batch in (1, 8)])
    print("\n# native zoo bridges: interp's KV cache vs recomputing")
    native = [
        native_workload(n, b, args.new, args.rounds)
        for n in ("zoo:induction-2l", "zoo:grammar-4l")
        for b in (1, 8)
    ]
    return 0 if ok and all(native) else 1


if __name__ == "__main__":
    sys.exit(main())
