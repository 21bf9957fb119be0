"""Run inside a venv with SAELens (``/work/venvs/saelens``); driven by tests/test_sae.py.

    python saelens_roundtrip.py read DIR...   # load each interp-saved DIR with SAE.load_from_disk
    python saelens_roundtrip.py write ROOT     # save one SAE per architecture under ROOT/<arch>
    python saelens_roundtrip.py both ROOT DIR...  # both, in one process (SAELens imports slowly)

Either way, for each directory it reads ``DIR/x.safetensors`` (an input ``x``; ``write`` makes it)
and writes ``DIR/saelens_out.safetensors`` with SAELens's ``encode(x)``, ``decode(encode(x))`` and
``forward(x)``, plus ``DIR/saelens_arch.txt`` (the class SAELens built). Imports SAELens only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def outputs(sae, directory: Path) -> None:
    x = load_file(str(directory / "x.safetensors"))["x"]
    with torch.no_grad():
        acts = sae.encode(x)
        out = {"acts": acts, "decoded": sae.decode(acts), "forward": sae(x)}
    save_file({k: v.contiguous() for k, v in out.items()}, str(directory / "saelens_out.safetensors"))
    (directory / "saelens_arch.txt").write_text(type(sae).__name__ + "\n")


def read(dirs: list[str]) -> None:
    from sae_lens import SAE

    for d in dirs:
        outputs(SAE.load_from_disk(d, device="cpu"), Path(d))


def write(root: str) -> None:
    import sae_lens as sl
    from sae_lens.saes.sae import SAEMetadata

    gen = torch.Generator().manual_seed(0)
    d_in, d_sae, d_out = 8, 24, 6
    meta = {"hook_name": "blocks.0.hook_resid_post", "model_name": "tiny"}
    configs = {
        "standard": sl.StandardSAEConfig(d_in=d_in, d_sae=d_sae),
        "topk": sl.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=5),
        "jumprelu": sl.JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae),
        "transcoder": sl.TranscoderConfig(d_in=d_in, d_sae=d_sae, d_out=d_out, apply_b_dec_to_input=False),
        "skip_transcoder": sl.SkipTranscoderConfig(
            d_in=d_in, d_sae=d_sae, d_out=d_out, apply_b_dec_to_input=False
        ),
    }
    for arch, cfg in configs.items():
        cfg.metadata = SAEMetadata(
            **meta, **({"hook_name_out": "blocks.0.hook_mlp_out"} if "trans" in arch else {})
        )
        sae = sl.SAE.from_dict(cfg.to_dict())
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=gen) * 0.5)
        out = Path(root) / arch
        sae.save_model(out)
        save_file({"x": torch.randn(16, d_in, generator=gen)}, str(out / "x.safetensors"))
        outputs(sae, out)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode in ("read", "both"):
        read(args[1:] if mode == "both" else args)
    if mode in ("write", "both"):
        write(args[0])
