"""The language-model surface (tokens, loss, generation) against TransformerLens 4.3 and HF.

TransformerLens's bridge is the oracle for token helpers and the loss (same weights, same text);
HF ``generate`` for greedy generation with a KV cache; a no-cache loop written here for the native
zoo bridge and for steering hooks.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import interp
from interp.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the cat sat on the mat", "a dog ran"]


@pytest.fixture(scope="module")
def bridge(gpt2_dir):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(gpt2_dir, device="cpu").eval()


@pytest.fixture(scope="module")
def varied_dir(gpt2_dir, tmp_path_factory):
    """The tiny GPT-2 with large random weights, so greedy continuations vary instead of repeating."""
    from transformers import GPT2LMHeadModel

    out = tmp_path_factory.mktemp("varied-gpt2")
    hf = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in hf.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.4)
    hf.save_pretrained(out)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{gpt2_dir}/{file}", out / file)
    return str(out)


@pytest.fixture(scope="module")
def varied(varied_dir):
    return interp.load(varied_dir)


@pytest.fixture(scope="module")
def induction():
    return interp.load("zoo:induction-2l")


# ------------------------------------------------------------------------------------------------
# Tokens
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prepend_bos", [None, True, False])
@pytest.mark.parametrize("padding_side", [None, "left"])
def test_to_tokens_equals_the_bridge_on_gpt2(gpt2_model, bridge, prepend_bos, padding_side):
    for text in (TEXTS[0], TEXTS):
        ours = gpt2_model.to_tokens(text, prepend_bos=prepend_bos, padding_side=padding_side)
        theirs = bridge.to_tokens(text, prepend_bos=prepend_bos, padding_side=padding_side)
        assert ours.dtype == torch.long and torch.equal(ours, theirs)


def test_to_tokens_equals_the_bridge_on_minilm(minilm):
    from transformer_lens.model_bridge import TransformerBridge

    tl = TransformerBridge.boot_transformers(minilm.source, device="cpu")
    for prepend_bos in (None, False):
        for text in ("Hello world", ["Hello world", "a b c d"]):
            assert torch.equal(
                minilm.to_tokens(text, prepend_bos=prepend_bos), tl.to_tokens(text, prepend_bos=prepend_bos)
            )
    assert (
        minilm.to_str_tokens("Hello world")
        == tl.to_str_tokens("Hello world")
        == ["[CLS]", "hello", "world", "[SEP]"]
    )


def test_str_tokens_string_and_positions_equal_the_bridge(gpt2_model, bridge):
    ids = gpt2_model.to_tokens(TEXTS[0])
    assert gpt2_model.to_str_tokens(TEXTS[0]) == bridge.to_str_tokens(TEXTS[0])
    assert gpt2_model.to_str_tokens(ids) == bridge.to_str_tokens(ids) == ["<|endoftext|>", *TEXTS[0].split()]
    assert gpt2_model.to_str_tokens(TEXTS) == bridge.to_str_tokens(TEXTS)
    assert gpt2_model.to_string(ids[0]) == bridge.to_string(ids[0])
    assert gpt2_model.to_string(gpt2_model.to_tokens(TEXTS)) == bridge.to_string(bridge.to_tokens(TEXTS))
    assert gpt2_model.to_single_token("cat") == bridge.to_single_token("cat") == 4
    assert gpt2_model.to_single_str_token(4) == bridge.to_single_str_token(4) == "cat"
    for mode in ("first", "last"):
        assert gpt2_model.get_token_position("the", TEXTS[0], mode=mode) == bridge.get_token_position(
            "the", TEXTS[0], mode=mode
        )
    assert gpt2_model.get_token_position(4, ids) == 2


def test_to_single_token_names_the_pieces_of_a_longer_string(gpt2_model, minilm):
    with pytest.raises(InputError, match=r"splits into 2 tokens \['the', 'cat'\]"):
        gpt2_model.to_single_token("the cat")
    assert minilm.to_single_token("cat") == minilm.tokenizer.convert_tokens_to_ids("cat")  # no [CLS]/[SEP]
    with pytest.raises(InputError, match="a string"):
        gpt2_model.to_single_token(4)
    with pytest.raises(InputError, match="does not occur"):
        gpt2_model.get_token_position("dog", TEXTS[0])


def test_zoo_models_get_readable_token_names(induction):
    modadd = interp.load("zoo:modadd-113")
    assert induction.to_tokens("t3 t17 t5").tolist() == [[64, 3, 17, 5]]  # BOS (id 64) first, as in training
    assert induction.to_tokens("t3 t17", prepend_bos=False).tolist() == [[3, 17]]
    assert induction.to_str_tokens(torch.tensor([64, 3, 17])) == ["BOS", "t3", "t17"]
    assert induction.to_string(torch.tensor([[64, 3], [1, 2]])) == ["BOS t3", "t1 t2"]
    assert modadd.to_tokens("t5 t7 =").tolist() == [[5, 7, 113]]  # no BOS in this recipe
    assert modadd(modadd.to_tokens("t5 t7 ="))[0, -1].argmax().item() == 12  # (5 + 7) mod 113
    _, cache = induction.run_with_cache(torch.tensor([[64, 3, 4]]), names="blocks.0.hook_resid_pre")
    assert cache.meta["str_tokens"] == [["BOS", "t3", "t4"]]
    _, cache = induction.run_with_cache("t3 t4", names="blocks.0.hook_resid_pre")
    assert cache.meta["input_ids"].tolist() == [[64, 3, 4]]
    assert induction.to_tokens(["t1 t2 t3", "t4"], padding_side="left").tolist() == [
        [64, 1, 2, 3],
        [64, 64, 64, 4],
    ]
    prompts = ["t1 t2 t3 t4 t1 t2", "t5 t6 t5"]  # left-padded together, each continues as alone
    assert induction.generate(prompts, 2, do_sample=False) == [
        induction.generate(p, 2, do_sample=False) for p in prompts
    ]
    with pytest.raises(InputError, match=r"'cat' is not a token.*t0 \.\. t64 or BOS"):
        induction.to_tokens("t3 cat")


def test_test_prompt_ranks_equal_a_hand_computation_and_tl(gpt2_model, bridge, capsys):
    result = interp.test_prompt(gpt2_model, "the cat sat on the", "mat", top_k=3)
    printed = capsys.readouterr().out
    ids = gpt2_model.to_tokens("the cat sat on the mat")
    probs = gpt2_model(ids)[0, -2].softmax(-1)
    rank = int((probs > probs[10]).sum())  # "mat" is id 10
    assert result.ranks == [("mat", rank)] and result.prompt_tokens[0] == "<|endoftext|>"
    assert result.answers[0].prob == pytest.approx(float(probs[10]), abs=1e-6)
    assert [t for t, _, _ in result.top[0]] == [
        gpt2_model.to_string(int(i)) for i in probs.argsort(descending=True)[:3]
    ]
    assert (
        "Tokenized prompt:" in printed
        and f"Rank: {rank}" in printed
        and "Ranks of the answer tokens" in printed
    )
    from transformer_lens.utilities import test_prompt as tl_test_prompt

    for answer in ("mat", "mat dog", ["mat", "rug dog"]):  # TL's printed ranks on its bridge: the same
        tl_test_prompt("the cat sat on the", answer, bridge, top_k=3)
        tl_ranks = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Ranks")]
        interp.test_prompt(gpt2_model, "the cat sat on the", answer, top_k=3)
        ours = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Ranks")]
        if isinstance(answer, list):  # TL nests a list per position: [[(a, r), (b, r)]]
            tl_ranks = [tl_ranks[0].replace("[[", "[").replace("]]", "]")]
        assert ours == tl_ranks
    several = interp.test_prompt(gpt2_model, "the cat sat on the", ["mat", "rug dog"], print_details=False)
    rug = int((probs > probs[11]).sum())  # a list compares the answers' first tokens at the next position
    assert several.ranks == [("mat", rank), ("rug", rug)]
    two = interp.test_prompt(gpt2_model, "the cat sat on the", "mat dog", print_details=False)
    after = gpt2_model(gpt2_model.to_tokens("the cat sat on the mat dog"))[0, -2].softmax(-1)
    assert two.ranks == [("mat", rank), ("dog", int((after > after[5]).sum()))]  # scored in context


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------


def test_loss_equals_the_bridge_and_cross_entropy_by_hand(gpt2_model, bridge):
    ids = gpt2_model.to_tokens(TEXTS[0])
    logits, loss = gpt2_model(ids, return_type="both")
    torch.testing.assert_close(logits, bridge(ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, bridge(ids, return_type="loss").detach(), atol=1e-5, rtol=0)
    per_token = gpt2_model(ids, return_type="loss", loss_per_token=True)
    by_hand = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    assert per_token.shape == (1, ids.shape[1] - 1)
    torch.testing.assert_close(per_token[0], by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(interp.loss_fn(logits, ids, per_token=True), per_token)
    assert gpt2_model(ids, return_type=None) is None
    # text with prepend_bos= is tokenized as TL's forward tokenizes it
    tl_text = bridge(TEXTS[0], return_type="loss").detach()
    torch.testing.assert_close(
        gpt2_model(TEXTS[0], return_type="loss", prepend_bos=True), tl_text, atol=1e-5, rtol=0
    )
    with pytest.raises(InputError, match="same batch and pos"):
        interp.loss_fn(logits, ids[:, :-1])


def test_loss_masks_padding_like_tl_lm_cross_entropy(gpt2_model):
    from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

    batch = gpt2_model.prepare(TEXTS)  # right-padded, with a mask
    logits = gpt2_model(batch)
    mask = batch.attention_mask
    ours = interp.loss_fn(logits, batch.input_ids, attention_mask=mask)
    torch.testing.assert_close(ours, lm_cross_entropy_loss(logits, batch.input_ids, mask), atol=1e-6, rtol=0)
    assert torch.equal(gpt2_model(batch, return_type="loss"), ours)
    short = gpt2_model(TEXTS[1], return_type="loss")  # the padded row alone, unpadded
    per_token = interp.loss_fn(logits, batch.input_ids, attention_mask=mask, per_token=True)
    torch.testing.assert_close(per_token[1, : mask[1].sum() - 1].mean(), short, atol=1e-5, rtol=0)


def test_encoder_models_have_no_next_token_loss_or_generation(minilm):
    for call in (
        lambda: minilm("Hello world", return_type="loss"),
        lambda: minilm.generate("Hello", max_new_tokens=2),
        lambda: interp.test_prompt(minilm, "Hello", "world"),
    ):
        with pytest.raises(InputError, match="encoder"):
            call()
    with pytest.raises(InputError, match="return_type"):
        minilm("Hello", return_type="logit")


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_greedy_generation_equals_hf_generate_batched_and_padded(varied):
    ids, mask = _left_padded([[0, 2, 4, 6, 8], [0, 3, 5]])
    ours = varied.generate(ids, 12, do_sample=False, stop_at_eos=False, attention_mask=mask)
    hf = varied.module.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert torch.equal(ours, hf)
    assert len(set(ours[0, 5:].tolist())) > 3  # a varied continuation, not one repeated token
    # each padded row continues as it does alone; the KV cache changes nothing
    for row, real in ((0, 5), (1, 3)):
        alone = varied.generate(ids[row : row + 1, -real:], 12, do_sample=False, stop_at_eos=False)
        assert torch.equal(alone[0], ours[row, 5 - real :])
    no_cache = varied.generate(
        ids, 12, do_sample=False, stop_at_eos=False, attention_mask=mask, use_past_kv_cache=False
    )
    assert torch.equal(no_cache, ours)


def test_generation_stops_at_eos_like_hf(varied):
    ids, mask = _left_padded([[0, 2, 4, 6, 8], [0, 3, 5]])
    free = varied.generate(ids, 12, do_sample=False, stop_at_eos=False, attention_mask=mask)
    eos = int(free[0, 7])  # a token row 0 emits at its third step: make it the EOS
    ours = varied.generate(ids, 12, do_sample=False, eos_token_id=eos, attention_mask=mask)
    hf = varied.module.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    assert torch.equal(ours, hf)
    assert (ours[0, 8:] == eos).all()  # finished rows are padded with EOS


def test_text_generation_returns_strings_like_the_bridge(varied, varied_dir):
    from transformer_lens.model_bridge import TransformerBridge

    tl = TransformerBridge.boot_transformers(varied_dir, device="cpu").eval()
    # TL's cached path diverges from its own no-cache loop here (from the second new token on, on
    # this tokenizer whose BOS is also its pad token); its no-cache loop is the reference.
    kwargs = {"max_new_tokens": 6, "do_sample": False, "verbose": False, "use_past_kv_cache": False}
    assert varied.generate(TEXTS[0], **kwargs) == tl.generate(TEXTS[0], **kwargs)
    assert varied.generate(TEXTS, **kwargs) == tl.generate(TEXTS, **kwargs)
    assert torch.equal(
        varied.generate(TEXTS, return_type="tokens", **kwargs),
        tl.generate(TEXTS, return_type="tokens", **kwargs),
    )


def test_sampling_is_seeded_and_top_k_one_is_greedy(varied):
    ids = varied.to_tokens(TEXTS[0])
    a = varied.generate(ids, 8, seed=1, stop_at_eos=False)
    assert torch.equal(a, varied.generate(ids, 8, seed=1, stop_at_eos=False))
    greedy = varied.generate(ids, 8, do_sample=False, stop_at_eos=False)
    assert torch.equal(varied.generate(ids, 8, top_k=1, seed=5, stop_at_eos=False), greedy)
    assert torch.equal(varied.generate(ids, 8, temperature=0.0, stop_at_eos=False), greedy)
    assert torch.equal(varied.generate(ids, 8, top_p=1e-6, seed=5, stop_at_eos=False), greedy)


def test_steering_hooks_apply_at_every_step_and_equal_a_loop_without_cache(varied):
    ids = varied.to_tokens(TEXTS[0])
    vector = torch.randn(varied.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 4
    hook = [("blocks.0.hook_resid_post", lambda act, h: act + vector)]
    plain = varied.generate(ids, 8, do_sample=False, stop_at_eos=False)
    steered = varied.generate(ids, 8, do_sample=False, stop_at_eos=False, hooks=hook)
    loop = ids
    for _ in range(8):
        loop = torch.cat([loop, varied.run_with_hooks(loop, hook)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(steered, loop) and not torch.equal(steered, plain)
    with varied.hooks(hook):  # hooks of an enclosing context stay active too
        assert torch.equal(varied.generate(ids, 8, do_sample=False, stop_at_eos=False), loop)
    assert torch.equal(varied.generate(ids, 8, do_sample=False, stop_at_eos=False), plain)  # and are gone


@pytest.mark.parametrize("use_cache", [False, True])
def test_head_hooks_inside_attention_steer_generation_with_and_without_cache(varied, use_cache):
    ids = varied.to_tokens(TEXTS)  # same length, no padding
    scale = torch.tensor([1.0, 0.0, 2.0, 1.0])[:, None]  # per head of hook_z [batch, pos, head, d_head]
    hooks = [("blocks.1.attn.hook_z", lambda z, h: z * scale), ("blocks.0.attn.hook_v", lambda v, h: v * 1.5)]
    out = varied.generate(
        ids[:1], 8, do_sample=False, stop_at_eos=False, hooks=hooks, use_past_kv_cache=use_cache
    )
    loop = ids[:1]
    for _ in range(8):
        loop = torch.cat([loop, varied.run_with_hooks(loop, hooks)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, loop)
    assert not torch.equal(out, varied.generate(ids[:1], 8, do_sample=False, stop_at_eos=False))


def test_native_zoo_generation_equals_a_loop_and_continues_a_repeat(induction):
    r = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([torch.full((2, 1), 64), r, r[:, :3]], dim=1)
    out = induction.generate(ids, 6, do_sample=False)  # no EOS in this vocabulary: runs to the end
    loop = ids
    for _ in range(6):
        loop = torch.cat([loop, induction(loop)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, loop)
    assert torch.equal(out[:, -6:], r[:, 3:9])  # the induction circuit copies the repeat
    text = induction.generate(induction.to_string(ids[0, 1:]), 3, do_sample=False)  # to_tokens puts BOS first
    assert text == induction.to_string(out[0, 1:-3])  # and the string skips it, as TL skips special tokens
    # left padding is masked (the bridge derives positions from the mask): a padded row continues as alone
    longer = torch.cat([ids[:1], r[:1, 3:5]], dim=1)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[1:]], dim=1)
    mask = torch.ones(2, longer.shape[1], dtype=torch.long)
    mask[1, :2] = 0
    both = induction.generate(torch.cat([longer, padded]), 4, do_sample=False, attention_mask=mask)
    assert torch.equal(both[1, 2:], induction.generate(ids[1:], 4, do_sample=False)[0])
    assert torch.equal(both[0], induction.generate(longer, 4, do_sample=False)[0])


def test_verbose_generation_reports_progress_through_tqdm(varied):
    from interp.progress import report_progress

    seen = []
    with report_progress(lambda fraction, desc: seen.append((fraction, desc))):
        varied.generate(varied.to_tokens(TEXTS[0]), 5, do_sample=False, stop_at_eos=False, verbose=True)
    assert seen and seen[-1] == (1.0, "generate")


def test_generate_rejects_bad_arguments_before_running(varied):
    ids = varied.to_tokens(TEXTS[0])
    for kwargs, match in (
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 40}, "context length"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"return_type": "text"}, "return_type"),
        ({"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0]])}, "left-padded"),
    ):
        with pytest.raises(InputError, match=match):
            varied.generate(ids, **{"max_new_tokens": 2, **kwargs})


def test_a_left_padded_row_reads_as_the_same_prompt_alone(gpt2_model):
    """HF numbers positions from the left edge unless given position ids: without them a left-padded
    row's logits differ from the prompt alone (by 0.22 on this model before the fix)."""
    from interp.models.transformer import Tokens

    short, long = [5, 9, 2], [7, 1, 4, 8, 3]
    ids = torch.tensor([[0, 0, *short], long])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded = gpt2_model(Tokens(ids, mask))
    alone = gpt2_model(torch.tensor([short]))
    torch.testing.assert_close(padded[0, 2:], alone[0], atol=1e-5, rtol=1e-5)
    _, cache = gpt2_model.run_with_cache(Tokens(ids, mask), names="blocks.1.hook_resid_post")
    _, solo = gpt2_model.run_with_cache(torch.tensor([short]), names="blocks.1.hook_resid_post")
    torch.testing.assert_close(cache["resid_post", 1][0, 2:], solo["resid_post", 1][0], atol=1e-5, rtol=1e-5)
