"""Readable names for the token ids of zoo transformers trained on ids (``t0``, ``t1``, ... ``t63``).

``induction-2l``/``induction-1l`` read ``BOS`` + symbols ``0..63`` and ``modadd-113`` reads
``a b =`` with ``a, b`` in ``0..112``: their ids have no text. :class:`IdVocabulary` gives each id a
name (``"t17"``, plus ``"BOS"`` or ``"="`` where the recipe defines that token) and the small slice
of the Hugging Face tokenizer interface the workbench uses, so every text view works on them:
``model.to_str_tokens(ids)``, ``model.to_tokens("t3 t17 t5")``, ``str_tokens`` in caches.

Text is the names separated by whitespace; anything else is an error naming the valid names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from interp.errors import InputError


class IdVocabulary:
    """A tokenizer whose tokens are the names of ids: ``t{i}`` for ordinary ids, or a special name.

    Args:
        size: number of ids (the model's ``d_vocab``).
        special: names for particular ids, e.g. ``{64: "BOS"}``.
        bos_id: the beginning-of-sequence id, if the model was trained with one. With
            ``add_bos=True`` encoding text puts it first, as the training data did.
    """

    is_id_vocabulary = True  # not a text tokenizer: callers with English sample text skip it
    eos_token = eos_token_id = None
    padding_side = "right"

    def __init__(
        self,
        size: int,
        special: dict[int, str] | None = None,
        bos_id: int | None = None,
        add_bos: bool = False,
    ) -> None:
        self.names = [f"t{i}" for i in range(size)]
        for i, name in (special or {}).items():
            self.names[i] = name
        self.ids = {name: i for i, name in enumerate(self.names)}
        self.bos_token_id = bos_id
        self.bos_token = None if bos_id is None else self.names[bos_id]
        self.add_bos = add_bos and bos_id is not None
        self.pad_token_id = bos_id if bos_id is not None else 0  # masked out wherever it pads
        self.pad_token = self.names[self.pad_token_id]
        self.all_special_ids = [] if bos_id is None else [bos_id]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def vocab_size(self) -> int:
        return len(self.names)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.ids)

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:3])
        return f"IdVocabulary({len(self)} ids: {shown}, ...; bos={self.bos_token})"

    # --- text -> ids ------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """The names in ``text`` (whitespace-separated); an unknown name is an InputError."""
        pieces = text.split()
        unknown = [p for p in pieces if p not in self.ids]
        if unknown:
            special = [n for n in self.names if not (n.startswith("t") and n[1:].isdigit())]
            extra = f" or {', '.join(special)}" if special else ""
            raise InputError(
                f"{unknown[0]!r} is not a token of this model: its tokens are named t0 .. t{len(self) - 1}"
                f"{extra}, separated by spaces (e.g. 't3 t17 t5')."
            )
        return pieces

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.ids[self.tokenize(tokens)[0]]
        return [self.ids[t] for t in self.tokenize(" ".join(tokens))]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.ids[p] for p in self.tokenize(text)]
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def __call__(
        self,
        text: str | Sequence[str],
        return_tensors: str | None = None,
        padding: bool = False,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        **_: Any,
    ) -> dict[str, Any]:
        """Like a Hugging Face tokenizer: ``{"input_ids", "attention_mask"}``, padded when asked."""
        rows = [self.encode(t, add_special_tokens) for t in ([text] if isinstance(text, str) else text)]
        if not padding and return_tensors is None:
            ids = rows[0] if isinstance(text, str) else rows
            return {"input_ids": ids, "attention_mask": [[1] * len(r) for r in rows]}
        width = max((len(r) for r in rows), default=0)
        if return_tensors is not None and len({len(r) for r in rows}) > 1 and not padding:
            raise InputError("texts of different lengths need padding=True")
        left = (padding_side or self.padding_side) == "left"
        ids, mask = [], []
        for r in rows:
            pad = [self.pad_token_id] * (width - len(r))
            ids.append(pad + r if left else r + pad)
            mask.append([0] * len(pad) + [1] * len(r) if left else [1] * len(r) + [0] * len(pad))
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask)}
        return {"input_ids": ids, "attention_mask": mask}

    # --- ids -> text ------------------------------------------------------------------------

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.ndim == 0):
            return self.names[int(ids)]
        return [self.names[int(i)] for i in ids]

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False, **_: Any) -> str:
        names = self.convert_ids_to_tokens(ids)
        names = [names] if isinstance(names, str) else names
        if skip_special_tokens:
            special = {self.names[i] for i in self.all_special_ids}
            names = [n for n in names if n not in special]
        return " ".join(names)

    def batch_decode(self, rows: Iterable[Iterable[int]], **kwargs: Any) -> list[str]:
        return [self.decode(row, **kwargs) for row in rows]


class WordVocabulary(IdVocabulary):
    """An id vocabulary whose every id is a word (``grammar-4l``): text is words separated by spaces.

    ``samples`` are inputs of the kind the model was trained on; :meth:`sample_text` hands them out
    (the explorer's "New random input").
    """

    def __init__(self, *args: Any, samples: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.samples = list(samples)

    def sample_text(self, seed: int = 0) -> str | None:
        """The ``seed``-th sample input (cycling), or None without samples."""
        return self.samples[seed % len(self.samples)] if self.samples else None

    def tokenize(self, text: str) -> list[str]:
        pieces = text.split()
        unknown = [p for p in pieces if p not in self.ids]
        if unknown:
            shown = " ".join(n for n in self.names if n != self.bos_token)
            raise InputError(
                f"{unknown[0]!r} is not a word of this model; write words separated by spaces, from: {shown}"
            )
        return pieces


def zoo_vocabulary(name: str, config: dict[str, Any]) -> IdVocabulary | None:
    """The vocabulary of zoo model ``name`` trained with ``config``; None for models that read no ids."""
    if name.startswith("induction-"):
        vocab = int(config["vocab"])  # BOS is id `vocab` (see zoo/induction.py)
        return IdVocabulary(vocab + 1, {vocab: "BOS"}, bos_id=vocab, add_bos=True)
    if name.startswith("modadd-"):
        p = int(config["p"])  # inputs are (a, b, =) with = the id p (see zoo/modadd.py)
        return IdVocabulary(p + 1, {p: "="})
    if name.startswith("grammar-"):
        from interp.models.zoo.grammar import BOS, SAMPLES, WORDS

        return WordVocabulary(len(WORDS), dict(enumerate(WORDS)), bos_id=BOS, add_bos=True, samples=SAMPLES)
    return None
