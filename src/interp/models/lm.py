"""The language-model surface of a transformer, with TransformerLens 4.3's names and semantics.

``LanguageModelMixin`` gives every transformer backend (plain HF models, MiniLM, zoo / native
bridges) the calls a TransformerLens user reaches for first:

* tokens: ``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``,
  ``to_single_str_token``, ``get_token_position``; and :func:`test_prompt`;
* loss: ``model(inputs, return_type="logits" | "loss" | "both" | None)`` and :func:`loss_fn`
  (TransformerLens's ``lm_cross_entropy_loss``: next-token loss, ``[batch, pos - 1]`` per token);
* generation: ``model.generate(...)``, greedy or sampled, batched with left padding, with the
  model's hooks active at every step (so steering applies to each new token).

Tokenization follows the bridge's ``to_tokens``: ``prepend_bos`` defaults to
``cfg.default_prepend_bos`` (True for most models); a tokenizer that adds its own BOS (or BERT's
``[CLS]``) keeps it, one that does not gets the BOS id put first, and ``prepend_bos=False`` removes
it. Inputs given as text to ``run_with_cache`` / ``run_with_hooks`` / ``model(text)`` are tokenized
with the tokenizer's own special tokens instead (no BOS is added on a GPT-2 tokenizer); pass
``model.to_tokens(text)`` (or ``prepend_bos=`` to ``model(...)``) for TransformerLens's convention.

Generation runs with a KV cache: Hugging Face's on HF models, interp's own on native
(``boot_native``) bridges (``interp.models.kvcache``; TransformerLens's bridge keeps none there and
recomputes the sequence each step). Each step after the prompt feeds one new position, so a hook
sees ``pos == 1`` there (as in TransformerLens). ``use_past_kv_cache=False`` recomputes instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from interp.errors import InputError

RETURN_TYPES = ("logits", "loss", "both", None)


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------


def loss_fn(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    per_token: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy, as TransformerLens's ``lm_cross_entropy_loss``.

    Position ``p``'s logits predict token ``p + 1``, so the last logit is unused and the per-token
    loss is ``[batch, pos - 1]``. With ``attention_mask`` (1 = real token) a prediction counts only
    when both its position and the next are real; masked entries are 0 per token and excluded from
    the mean.
    """
    if logits.ndim != 3 or tokens.ndim != 2 or logits.shape[:2] != tokens.shape:
        raise InputError(
            f"loss_fn needs logits [batch, pos, d_vocab] and tokens [batch, pos] of the same batch and pos; "
            f"got logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}"
        )
    if tokens.shape[1] < 2:
        raise InputError(
            "the next-token loss needs at least 2 positions (the first token is never predicted)"
        )
    tokens = tokens.to(logits.device).long()
    log_probs = F.log_softmax(logits, dim=-1)
    predicted = log_probs[:, :-1].gather(dim=-1, index=tokens[:, 1:, None])[..., 0]
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise InputError(
                f"attention_mask must have the tokens' shape {tuple(tokens.shape)}, got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(logits.device).bool()
        keep = mask[:, :-1] & mask[:, 1:]
        predicted = predicted.masked_fill(~keep, 0.0)
        count = keep.sum()
    else:
        count = predicted.numel()
    if per_token:
        return -predicted
    return -predicted.sum() / count


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token ``[batch]`` from last-position logits ``[batch, d_vocab]`` (TransformerLens's
    ``sample_logits``: greedy when not sampling or at temperature 0; else temperature, then top-k
    or top-p filtering, then a categorical draw)."""
    if not do_sample or temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        k = min(top_k, logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        ordered, order = torch.sort(logits, descending=True)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, return_type: str
) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if return_type not in ("input", "str", "tokens"):
        raise InputError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")


# ------------------------------------------------------------------------------------------------
# The mixin
# ------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """Token ids ``[batch, pos]`` and the mask of real tokens (None = all real)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None


class LanguageModelMixin:
    """Tokens, loss and generation for ``TransformerModel`` (see the module docstring).

    It relies on the host's ``tokenizer``, ``cfg``, ``n_ctx``, ``name``, ``module``, ``prepare``,
    ``_forward``, ``hooks`` and ``_lock``.
    """

    # --- tokens ---------------------------------------------------------------------------------

    def to_tokens(
        self,
        input: str | Sequence[str],  # noqa: A002 (TransformerLens's name)
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Text -> token ids ``[batch, pos]`` (a LongTensor), as TransformerLens's ``to_tokens``.

        ``prepend_bos`` defaults to ``cfg.default_prepend_bos``; ``padding_side`` to the
        tokenizer's (right). ``truncate`` cuts inputs to the context length.
        """
        ids = self._tl_tokens(input, prepend_bos, padding_side, truncate).input_ids
        return ids.to(self.device) if move_to_device else ids

    def to_str_tokens(
        self,
        input: str | Sequence[Any] | torch.Tensor,  # noqa: A002
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> list[str] | list[list[str]]:
        """Each token as a string. Text is tokenized with ``to_tokens``; a list gives one list per
        item; a tensor (``[pos]`` or ``[1, pos]``) or array of ids is read as is."""
        if isinstance(input, list | tuple):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        else:
            ids = torch.as_tensor(input).squeeze()
            if ids.ndim == 0:
                ids = ids.unsqueeze(0)
            if ids.ndim != 1:
                raise InputError(
                    f"to_str_tokens takes one sequence of ids ([pos] or [1, pos]), got shape {tuple(ids.shape)}; "
                    "pass the rows one at a time"
                )
        tokenizer = self._need_tokenizer()
        return list(
            tokenizer.batch_decode([[int(t)] for t in ids.tolist()], clean_up_tokenization_spaces=False)
        )

    def to_string(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Token ids -> text: one string for ``[pos]``, a list of strings for ``[batch, pos]``."""
        tokenizer = self._need_tokenizer()
        ids = torch.as_tensor(tokens)
        if ids.ndim == 2:
            return list(tokenizer.batch_decode(ids.tolist(), clean_up_tokenization_spaces=False))
        if ids.ndim <= 1:
            return tokenizer.decode(ids.reshape(-1).tolist(), clean_up_tokenization_spaces=False)
        raise InputError(f"to_string takes ids of shape [pos] or [batch, pos], got {tuple(ids.shape)}")

    def to_single_token(self, string: str) -> int:
        """The id of the one token ``string`` is (no special tokens added).

        A string that is several tokens is an InputError naming them.
        """
        if not isinstance(string, str):
            raise InputError(f"to_single_token takes a string, got {type(string).__name__} {string!r}")
        tokenizer = self._need_tokenizer()
        ids = tokenizer(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
            raise InputError(
                f"{string!r} is not a single token for {self.name}: it splits into {len(ids)} tokens {pieces}. "
                "Pass one of those tokens (note a leading space is part of the token), or the token id."
            )
        return int(ids[0])

    def to_single_str_token(self, int_token: int) -> str:
        """The string of token id ``int_token``."""
        if not isinstance(int_token, int):
            raise InputError(f"to_single_str_token takes an int token id, got {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(
        self,
        single_token: str | int,
        input: str | torch.Tensor,  # noqa: A002
        mode: str = "first",
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> int:
        """Position of ``single_token`` (a string that is one token, or an id) in ``input`` (text or
        ids ``[pos]`` / ``[1, pos]``): its ``"first"`` or ``"last"`` occurrence."""
        if mode not in ("first", "last"):
            raise InputError(f"mode must be 'first' or 'last', got {mode!r}")
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            ids = torch.as_tensor(input)
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise InputError(
                    f"ids must be [pos] or [1, pos] to find a position in, got {tuple(ids.shape)}"
                )
            ids = ids[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        where = (ids == token).nonzero().flatten()
        if where.numel() == 0:
            shown = self.to_str_tokens(ids) if self.tokenizer is not None else ids.tolist()
            raise InputError(f"token {single_token!r} (id {token}) does not occur in the input {shown}")
        return int(where[0] if mode == "first" else where[-1])

    # --- forward with a return type -------------------------------------------------------------

    def __call__(
        self,
        inputs: Any,
        return_type: str | None = "logits",
        *,
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Any:
        """Forward (no autograd), returning TransformerLens's ``return_type``.

        ``"logits"`` (default): the main output; ``"loss"``: :func:`loss_fn` on the input tokens
        (per token with ``loss_per_token``); ``"both"``: ``(logits, loss)``; ``None``: runs the
        forward (for its hooks) and returns None. The loss masks padding. Text is tokenized as
        ``run_with_cache`` does, or with ``to_tokens`` when ``prepend_bos``/``padding_side`` is given.
        """
        if return_type not in RETURN_TYPES:
            raise InputError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        if return_type in ("loss", "both"):
            self._require_causal_lm(f"return_type={return_type!r} (a next-token loss)")
        prepared = self._prepare_text(inputs, prepend_bos, padding_side)
        if attention_mask is not None:
            prepared.attention_mask = torch.as_tensor(attention_mask).to(prepared.input_ids.device)
        with self._lock, torch.no_grad():
            logits = self._forward(prepared)
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        loss = loss_fn(logits, prepared.input_ids, prepared.attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def loss_fn(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> torch.Tensor:
        """:func:`loss_fn` (TransformerLens's ``model.loss_fn``)."""
        self._require_causal_lm("loss_fn (a next-token loss)")
        return loss_fn(logits, tokens, attention_mask, per_token)

    # --- generation -----------------------------------------------------------------------------

    def generate(
        self,
        input: str | Sequence[str] | torch.Tensor = "",  # noqa: A002
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        return_type: str = "input",
        verbose: bool = False,
        *,
        attention_mask: torch.Tensor | None = None,
        seed: int | None = None,
        hooks: Sequence[tuple[Any, Callable]] = (),
    ) -> str | list[str] | torch.Tensor:
        """Continue ``input`` by ``max_new_tokens`` tokens, as TransformerLens's ``generate``.

        Args:
            input: a prompt, a list of prompts (left-padded, padding masked), or ids ``[batch, pos]``
                (with ``attention_mask`` marking real tokens if they are padded).
            max_new_tokens: tokens to add (fewer if every row stops at EOS).
            stop_at_eos: a row that emits EOS (``eos_token_id`` or the tokenizer's) is finished and
                padded with EOS from then on. A vocabulary without an EOS never stops early.
            do_sample, temperature, top_k, top_p: greedy (``do_sample=False`` or temperature 0),
                else a temperature-scaled draw from the top-k or top-p tokens.
            use_past_kv_cache: reuse keys and values of earlier positions (HF models and native
                bridges; a bridge over another attention recomputes the sequence).
            prepend_bos, padding_side: how text is tokenized (see ``to_tokens``).
            return_type: ``"str"``, ``"tokens"`` (ids ``[batch, pos + new]``, prompt included), or
                ``"input"``: strings for text input, ids for ids.
            verbose: show a tqdm bar over the steps.
            seed: seeds the sampling (a private generator; the global RNG is left alone).
            hooks: ``(name, fn)`` hooks active at every step, as in ``run_with_hooks``. Hooks from an
                enclosing ``with model.hooks(...)`` stay active too. With the KV cache a step after the
                first runs only the new position, so hooks see ``pos == 1`` there, as in TransformerLens
                (keys and values at ``hook_k``/``hook_v`` span every position on HF models, where HF
                concatenates its cache before the attention hooks; on native bridges they hold the new
                position, as in TransformerLens); use ``use_past_kv_cache=False`` for a hook that
                indexes positions.
        """
        self._require_causal_lm("generate")
        _check_sampling(max_new_tokens, temperature, top_k, top_p, return_type)
        batch, text_input = self._generation_input(input, prepend_bos, padding_side, attention_mask)
        prompt_len = batch.input_ids.shape[1]
        if self.n_ctx is not None and prompt_len + max_new_tokens > self.n_ctx:
            raise InputError(
                f"the prompt has {prompt_len} tokens and max_new_tokens={max_new_tokens}, but {self.name} "
                f"takes at most {self.n_ctx} tokens (its context length). Generate fewer tokens or shorten the prompt."
            )
        stop = self._stop_tokens(eos_token_id) if stop_at_eos else []
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

        def choose(logits: torch.Tensor) -> torch.Tensor:
            return sample_next(
                logits,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )

        with self._lock, self.hooks(hooks), torch.no_grad():
            ids = self._decode(batch, max_new_tokens, choose, stop, use_past_kv_cache, verbose)
        if return_type == "tokens" or (return_type == "input" and not text_input):
            return ids
        texts = [self._need_tokenizer().decode(row.tolist(), skip_special_tokens=True) for row in ids]
        return texts[0] if isinstance(input, str) or len(texts) == 1 else texts

    def _decode(
        self,
        batch: _Batch,
        max_new_tokens: int,
        choose: Callable[[torch.Tensor], torch.Tensor],
        stop: list[int],
        use_cache: bool,
        verbose: bool,
    ) -> torch.Tensor:
        """The generation loop: ids ``[batch, pos + generated]``."""
        from tqdm.auto import tqdm

        ids = batch.input_ids
        mask = batch.attention_mask
        if mask is None:
            mask = torch.ones_like(ids)
        step = self._cached_stepper() if use_cache else None
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        stop_ids = torch.tensor(stop, device=ids.device, dtype=torch.long)
        state: Any = None
        for _ in tqdm(range(max_new_tokens), desc="generate", disable=not verbose):
            if step is not None:
                logits, state = step(ids, mask, state)
            else:
                logits = self._full_step(ids, mask)
            new = choose(logits)
            if stop:
                new = new.masked_fill(finished, stop[0])
                finished |= torch.isin(new, stop_ids)
            ids = torch.cat([ids, new[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if stop and bool(finished.all()):
                break
        return ids

    def _full_step(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last-position logits ``[batch, d_vocab]`` from a forward over the whole sequence."""
        from interp.models.transformer import Tokens

        padded = not bool(mask.all())
        if hasattr(self, "adapter"):  # HF: positions must skip left padding, as the cached path does
            self._select_attention(Tokens(ids, mask))  # eager attention with hook points if any is hooked
            out = self.module(
                input_ids=ids,
                attention_mask=mask,
                position_ids=_positions(mask) if padded else None,
                use_cache=False,
            )
            return out.logits[:, -1]
        return self._forward(Tokens(ids, mask if padded else None))[:, -1]

    def _cached_stepper(self) -> Callable | None:
        """``step(ids, mask, state) -> (last logits, state)`` running the HF model with its KV cache,
        feeding only the positions the cache has not seen; None where there is no cache.
        ``NativeTransformer`` has its own (``interp.models.kvcache``)."""
        if not hasattr(self, "adapter"):
            return None
        from interp.models.transformer import Tokens

        cache_arg, keep_arg = self._hf_forward_args

        def step(ids: torch.Tensor, mask: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
            if state is None:
                self._select_attention(Tokens(ids, mask))
                new, kwargs = ids, {}
            else:
                new, kwargs = ids[:, -1:], {cache_arg: state}
            if keep_arg:
                kwargs["logits_to_keep"] = 1
            out = self.module(
                input_ids=new,
                attention_mask=mask,
                position_ids=_positions(mask)[:, -new.shape[1] :],
                use_cache=True,
                **kwargs,
            )
            return out.logits[:, -1], getattr(out, cache_arg)

        return step

    @cached_property
    def _hf_forward_args(self) -> tuple[str, bool]:
        """The HF forward's name for the KV cache (``cache`` in transformers 5, else
        ``past_key_values``) and whether it takes ``logits_to_keep``."""
        params = inspect.signature(self.module.forward).parameters
        return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params

    def _generation_input(
        self,
        input: Any,
        prepend_bos: bool | None,
        padding_side: str | None,
        attention_mask: Any,  # noqa: A002
    ) -> tuple[_Batch, bool]:
        if isinstance(input, str) or (
            isinstance(input, list | tuple) and input and isinstance(input[0], str)
        ):
            side = "left" if not isinstance(input, str) and len(input) > 1 else padding_side
            return self._on_device(self._tl_tokens(input, prepend_bos, side, truncate=False)), True
        ids = torch.as_tensor(input)
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        checked = self._check_tokens(_as_tokens(ids, None))
        mask = None
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).to(checked.input_ids.device).long()
            if mask.shape != checked.input_ids.shape:
                raise InputError(
                    f"attention_mask {tuple(mask.shape)} must match the prompt ids {tuple(checked.input_ids.shape)}"
                )
            if bool((mask[:, -1] == 0).any()):
                raise InputError(
                    "generate needs left-padded prompts (each row's last token real, pads first); "
                    "pad on the left, e.g. model.to_tokens(texts, padding_side='left')"
                )
        return _Batch(checked.input_ids, mask), False

    def _stop_tokens(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        if eos_token_id is None:
            eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
            return [] if eos is None else [int(eos)]
        return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]

    # --- helpers --------------------------------------------------------------------------------

    @property
    def is_causal_lm(self) -> bool:
        """Whether the model predicts the next token (causal attention and an unembedding)."""
        if getattr(self.cfg, "attention_dir", "causal") != "causal":
            return False
        head = getattr(self.module, "get_output_embeddings", None)
        return head is None or not callable(head) or head() is not None

    def _require_causal_lm(self, what: str) -> None:
        if not self.is_causal_lm:
            raise InputError(
                f"{what} needs a causal language model, but {self.name} is an encoder (bidirectional attention, "
                "no next-token head): it has no next token to predict. Use a decoder such as a local GPT-2 "
                "directory or a zoo transformer (zoo:induction-2l)."
            )

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InputError(
                f"{self.name} has no tokenizer, so it cannot read or write text. Pass token ids "
                "(a LongTensor of shape (batch, pos)) instead."
            )
        return self.tokenizer

    def _id_names(self, prepared: Any) -> list[list[str]] | None:
        """Token names of id inputs for a cache's ``str_tokens``, on models with an id vocabulary
        (zoo models); None elsewhere (an id input to a text model keeps no strings)."""
        if not getattr(self.tokenizer, "is_id_vocabulary", False):
            return None
        ids, mask = prepared.input_ids, prepared.attention_mask
        rows = [row if mask is None else row[mask[i].bool()] for i, row in enumerate(ids.cpu())]
        return [self.tokenizer.convert_ids_to_tokens(row.tolist()) for row in rows]

    def _prepare_text(self, inputs: Any, prepend_bos: bool | None, padding_side: str | None) -> Any:
        is_text = isinstance(inputs, str) or (
            isinstance(inputs, list | tuple) and inputs and isinstance(inputs[0], str)
        )
        if is_text and (prepend_bos is not None or padding_side is not None):
            batch = self._on_device(self._tl_tokens(inputs, prepend_bos, padding_side))
            return self.prepare(_as_tokens(batch.input_ids, batch.attention_mask))
        return self.prepare(inputs)

    def _on_device(self, batch: _Batch) -> _Batch:
        mask = batch.attention_mask
        return _Batch(batch.input_ids.to(self.device), None if mask is None else mask.to(self.device))

    @cached_property
    def _tokenizer_specials(self) -> tuple[bool, bool]:
        """Whether the tokenizer itself puts a BOS (or ``[CLS]``) first / an EOS last (as TL's
        ``detect_tokenizer_bos_eos``)."""
        tokenizer = self._need_tokenizer()
        if getattr(tokenizer, "is_id_vocabulary", False):
            return tokenizer.add_bos, False
        ids = tokenizer("a")["input_ids"]
        leading = {
            i for i in (tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)) if i is not None
        }
        prepends = len(ids) > 1 and ids[0] in leading
        appends = len(ids) > 1 and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id
        return prepends, appends

    def _tl_tokens(
        self,
        input: Any,
        prepend_bos: bool | None,
        padding_side: str | None,
        truncate: bool = True,  # noqa: A002
    ) -> _Batch:
        """TransformerLens's tokenization (see the module docstring): ids and the mask of real tokens."""
        tokenizer = self._need_tokenizer()
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("text input must be a non-empty string or a list of strings")
        if prepend_bos is None:
            prepend_bos = bool(getattr(self.cfg, "default_prepend_bos", True))
        side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        prepends, appends = self._tokenizer_specials
        # as TL's setup_tokenizer: a tokenizer without a BOS uses its EOS ([CLS] on BERT, which adds it)
        candidates = (getattr(tokenizer, a, None) for a in ("bos_token_id", "cls_token_id", "eos_token_id"))
        bos = next((int(i) for i in candidates if i is not None), None)
        rows = [tokenizer(t)["input_ids"] for t in texts]
        rows = [list(r[0] if r and isinstance(r[0], list) else r) for r in rows]
        if appends:  # as TL: drop the trailing EOS a tokenizer adds (e.g. OLMo)
            rows = [r[:-1] if len(r) > 1 else r for r in rows]
        if prepend_bos and not prepends and bos is not None:
            rows = [[bos, *r] for r in rows]
        elif not prepend_bos and prepends:
            rows = [r[1:] for r in rows]
        if truncate and self.n_ctx is not None:
            rows = [r[: self.n_ctx] for r in rows]
        return _pad(rows, side, _pad_id(tokenizer))


def _pad(rows: list[list[int]], side: str, pad_id: int) -> _Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return _Batch(ids, mask if len({len(r) for r in rows}) > 1 else None)


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as HF ``generate`` makes them (pads get 0)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


def _as_tokens(ids: torch.Tensor, mask: torch.Tensor | None) -> Any:
    from interp.models.transformer import Tokens

    return Tokens(ids, mask)


# ------------------------------------------------------------------------------------------------
# test_prompt
# ------------------------------------------------------------------------------------------------


@dataclass
class AnswerRank:
    """How the model ranks one answer token at its position."""

    token: str
    rank: int
    logit: float
    prob: float


@dataclass
class PromptTest:
    """What :func:`test_prompt` printed: the tokens, each answer token's rank, and the top tokens.

    One answer: ``answers`` has one entry per answer token (each scored with the earlier ones in
    context). Several answers: one entry per answer, for its first token, all at the next position.
    ``top[i]`` is the ``(token, logit, prob)`` list at answer position ``i``.
    """

    prompt_tokens: list[str]
    answer_tokens: list[list[str]]
    answers: list[AnswerRank]
    top: list[list[tuple[str, float, float]]] = field(default_factory=list)

    @property
    def ranks(self) -> list[tuple[str, int]]:
        return [(a.token, a.rank) for a in self.answers]


def test_prompt(
    model: Any,
    prompt: str,
    answer: str | Sequence[str],
    prepend_space_to_answer: bool = True,
    print_details: bool = True,
    prepend_bos: bool | None = None,
    top_k: int = 10,
) -> PromptTest:
    """TransformerLens's ``utils.test_prompt``: the rank, logit and probability of each token of
    ``answer`` after ``prompt`` (and the ``top_k`` tokens at each position), printed like TL's and
    returned as a :class:`PromptTest`.

    A multi-token answer is scored token by token with the earlier answer tokens in context; a list
    of answers compares their first tokens at the next position. ``prepend_space_to_answer`` adds a
    leading space to an answer that has none.
    """
    answers = [answer] if isinstance(answer, str) else list(answer)
    if not answers or not all(isinstance(a, str) and a for a in answers):
        raise InputError("answer must be a non-empty string or a list of them")
    model._require_causal_lm("test_prompt")
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    several = len(answers) > 1
    prompt_ids = model.to_tokens(prompt, prepend_bos=prepend_bos)
    answer_rows = [model.to_tokens(a, prepend_bos=False) for a in answers]
    answer_ids = torch.cat([row[:, :1] for row in answer_rows]) if several else answer_rows[0]
    ids = torch.cat([prompt_ids.repeat(len(answer_ids), 1), answer_ids], dim=1)
    logits = model(ids)
    probs = logits.softmax(dim=-1)
    answer_str = [model.to_str_tokens(row[0]) for row in answer_rows]
    result = PromptTest(model.to_str_tokens(prompt_ids[0]), answer_str, [])
    if print_details:
        print("Tokenized prompt:", result.prompt_tokens)
        print(
            "Tokenized answers:" if several else "Tokenized answer:", answer_str if several else answer_str[0]
        )
    start = prompt_ids.shape[1]
    for offset in range(answer_ids.shape[1]):
        at = start + offset - 1  # logits at the previous position predict this token
        lines = []
        for row, token in enumerate(answer_ids[:, offset].tolist()):
            rank = int((probs[row, at] > probs[row, at, token]).sum())
            name = answer_str[row][offset]
            entry = AnswerRank(name, rank, float(logits[row, at, token]), float(probs[row, at, token]))
            result.answers.append(entry)
            lines.append(
                f"Rank: {rank: <8} Logit: {entry.logit:5.2f} Prob: {entry.prob:6.2%} Token: |{name}|"
            )
        order = probs[0, at].argsort(descending=True)[:top_k]
        top = [(model.to_string(int(t)), float(logits[0, at, t]), float(probs[0, at, t])) for t in order]
        result.top.append(top)
        if print_details:
            print(f"Performance on answer token{'s' if several else ''}:")
            print("\n".join(lines))
            for i, (text, logit, prob) in enumerate(top):
                print(f"Top {i}th token. Logit: {logit:5.2f} Prob: {prob:6.2%} Token: |{text}|")
    print(f"Ranks of the answer tokens: {result.ranks}")
    return result


test_prompt.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
