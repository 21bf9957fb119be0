"""``SAEConfig``: what a sparse dictionary is, in SAELens's ``cfg.json`` vocabulary.

The keys are SAELens 6's (``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``device``,
``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, and a ``metadata``
block holding ``hook_name``, ``model_name`` ...), so a ``cfg.json`` written here reads in SAELens and
one written by SAELens reads here. Transcoders add ``d_out`` and ``metadata.hook_name_out``; TopK adds
``k``. Anything else SAELens writes is kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from interp.errors import InputError

# Inference architectures (what a cfg.json may say) and how each is stored.
ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu", "transcoder", "skip_transcoder")
TRANSCODERS = ("transcoder", "skip_transcoder")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
_TOP_LEVEL = (
    "architecture",
    "d_in",
    "d_sae",
    "d_out",
    "k",
    "rescale_acts_by_decoder_norm",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
)


@dataclass
class SAEConfig:
    """A dictionary's shape and semantics.

    Attributes:
        d_in: width of the activation it reads (the hook's last dimension).
        d_sae: number of latents.
        architecture: one of ``ARCHITECTURES``.
        hook_name: the hook it reads (``metadata.hook_name`` on disk).
        hook_name_out: transcoders only: the hook it writes (``metadata.hook_name_out``).
        d_out: transcoders only: width of ``hook_name_out`` (defaults to ``d_in``).
        k: TopK / BatchTopK: latents kept per token (on average per token for BatchTopK).
        rescale_acts_by_decoder_norm: TopK: rank ``pre * ‖W_dec row‖`` and divide it out to decode.
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding.
        normalize_activations: ``"none"`` or one of SAELens's run-time normalizations.
        reshape_activations: ``"none"``, or ``"hook_z"``: a ``[..., head, d_head]`` input is read
            as ``[..., head * d_head]`` (attention-output SAEs), and the output takes the input's shape.
        dtype, device: what the weights are made in.
        metadata: the rest of SAELens's metadata (model_name, context_size, prepend_bos, dataset...).
        extra: top-level keys this version does not interpret, kept for a faithful rewrite.
    """

    d_in: int
    d_sae: int
    architecture: str = "standard"
    hook_name: str = ""
    hook_name_out: str | None = None
    d_out: int | None = None
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in TRANSCODERS

    @property
    def width_out(self) -> int:
        """Width of what the dictionary writes: ``d_out`` for transcoders, else ``d_in``."""
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def hook_out(self) -> str:
        """The hook the reconstruction replaces: ``hook_name_out`` for transcoders, else ``hook_name``."""
        return self.hook_name_out if self.is_transcoder and self.hook_name_out else self.hook_name

    def validate(self) -> None:
        """Refuse a config that cannot describe a working dictionary, naming the field and the fix."""
        if self.architecture not in ARCHITECTURES:
            from interp.errors import closest

            near = closest(str(self.architecture), ARCHITECTURES, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise InputError(
                f"unknown SAE architecture {self.architecture!r}.{hint} "
                f"Supported: {', '.join(ARCHITECTURES)} (gated SAEs are not supported yet)."
            )
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"SAE cfg {name} must be a positive integer, got {value!r}")
        if self.architecture in ("topk", "batchtopk") and (
            not isinstance(self.k, int) or not 0 < self.k <= self.d_sae
        ):
            raise InputError(
                f"a {self.architecture} SAE needs k, the latents kept per token, in [1, d_sae={self.d_sae}]; "
                f"got k={self.k!r}"
            )
        if self.is_transcoder and not self.hook_name_out:
            raise InputError(
                f"a {self.architecture} reads one hook and writes another: set hook_name_out "
                "(e.g. hook_name='blocks.0.ln2.hook_normalized', hook_name_out='blocks.0.hook_mlp_out')"
            )
        if self.is_transcoder and self.apply_b_dec_to_input:
            raise InputError(
                "a transcoder's b_dec lives in its output space, so apply_b_dec_to_input must be False "
                "(SAELens refuses it too); pass apply_b_dec_to_input=False"
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise InputError(
                f"normalize_activations={self.normalize_activations!r} is not supported; "
                f"use one of {', '.join(NORMALIZATIONS)}"
            )
        if self.reshape_activations not in ("none", "hook_z", None):
            raise InputError(
                f"reshape_activations={self.reshape_activations!r} is not supported; use 'none' or 'hook_z'"
            )

    # --- SAELens cfg.json ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The ``cfg.json`` content, with SAELens 6's keys."""
        metadata = {**self.metadata, "hook_name": self.hook_name}
        if self.is_transcoder:
            metadata["hook_name_out"] = self.hook_name_out
        out: dict[str, Any] = {
            **self.extra,
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": self.device,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": self.reshape_activations,
            "metadata": metadata,
        }
        if self.is_transcoder:
            out["d_out"] = self.width_out
        if self.architecture in ("topk", "batchtopk"):
            out["k"] = self.k
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Read a ``cfg.json`` dict (SAELens 6 layout; SAELens 5's flat ``hook_name`` also accepted)."""
        if not isinstance(data, dict):
            raise InputError(f"an SAE cfg must be a JSON object, got {type(data).__name__}")
        missing = [key for key in ("d_in", "d_sae") if key not in data]
        if missing:
            raise InputError(f"SAE cfg lacks {', '.join(missing)}; a cfg.json must give d_in and d_sae")
        metadata = dict(data.get("metadata") or {})
        hook_name = metadata.pop("hook_name", None) or data.get("hook_name") or ""
        hook_name_out = metadata.pop("hook_name_out", None) or data.get("hook_name_out")
        extra = {
            k: v for k, v in data.items() if k not in _TOP_LEVEL and k not in ("hook_name", "hook_name_out")
        }
        return cls(
            d_in=data["d_in"],
            d_sae=data["d_sae"],
            architecture=data.get("architecture", "standard"),
            hook_name=hook_name,
            hook_name_out=hook_name_out,
            d_out=data.get("d_out"),
            k=data.get("k"),
            rescale_acts_by_decoder_norm=bool(data.get("rescale_acts_by_decoder_norm", False)),
            apply_b_dec_to_input=bool(
                data.get("apply_b_dec_to_input", data.get("architecture") not in TRANSCODERS)
            ),
            normalize_activations=data.get("normalize_activations") or "none",
            reshape_activations=data.get("reshape_activations") or "none",
            dtype=str(data.get("dtype", "float32")).removeprefix("torch."),
            device=str(data.get("device", "cpu")),
            metadata=metadata,
            extra=extra,
        )
