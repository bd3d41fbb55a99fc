"""LoRA on the DiT through peft (diffusers' PEFT integration), and merging it back into plain weights."""
from __future__ import annotations

import torch

from .errors import CheckpointError

ADAPTER = "default"


def add_lora(transformer: torch.nn.Module, *, rank: int, alpha: int, init: str | bool = "gaussian",
             targets: str | list[str], adapter_name: str = ADAPTER) -> torch.nn.Module:
    """Inject a LoRA adapter (peft ``LoraConfig``) into a diffusers transformer; only it trains.

    ``init="gaussian"`` is the paper's choice (peft: A ~ N(0, (1/r)^2), i.e. standard deviation 1/r -- not
    variance 1/r --, and B = 0, so the adapter starts as a no-op).
    The adapter's weights are float32 whatever the DiT's dtype (peft creates them in the base layer's dtype;
    bf16 weights would lose small optimizer updates); peft's LoRA layer casts its input to the adapter's dtype
    and its output back, so a bf16 base with a float32 adapter runs as it is.
    """
    from peft import LoraConfig

    init_value = True if init in (True, "default", "kaiming") else init
    transformer.requires_grad_(False)
    try:
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init_value,
                                           target_modules=targets), adapter_name=adapter_name)
    except ValueError as exc:
        raise CheckpointError(f"LoRA targets {targets!r} match no module of the DiT ({exc})") from None
    for name, p in transformer.named_parameters():
        if "lora_" in name and p.dtype != torch.float32:
            p.data = p.data.float()
    return transformer


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of ``model`` (same class, same config) with every LoRA merged into its base weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
        clean = type(model).from_config(model.config).to(dtype=next(model.parameters()).dtype)
        clean.load_state_dict(state)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.unmerge()
    return clean


def lora_state_dict(transformer: torch.nn.Module, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights keyed by module path (``transformer_blocks.0.attn.to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in
            get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}


def save_lora(transformer: torch.nn.Module, path, adapter_name: str = ADAPTER, base_model: str | None = None) -> None:
    """Write the LoRA in both formats users load (``base_model``: the editor it belongs to, recorded as peft's
    ``base_model_name_or_path``):

    * diffusers: ``pytorch_lora_weights.safetensors`` (keys ``transformer.*``), what
      ``HunyuanVideoPipeline.load_lora_weights(path)`` and ``transformer.load_lora_adapter(path)`` read;
    * peft: ``adapter_config.json`` + ``adapter_model.safetensors`` (keys ``base_model.model.*``), what
      ``PeftModel.from_pretrained(model, path)`` reads.
    """
    import json
    from pathlib import Path

    from diffusers import HunyuanVideoPipeline
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(transformer, adapter_name)
    config = transformer.peft_config[adapter_name]
    HunyuanVideoPipeline.save_lora_weights(path, transformer_lora_layers=state,
                                           transformer_lora_adapter_metadata=config.to_dict())
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(path / "adapter_model.safetensors"))
    cfg = config.to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    if base_model is not None:
        cfg["base_model_name_or_path"] = str(base_model)
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str))


def load_lora(transformer: torch.nn.Module, path, adapter_name: str = ADAPTER) -> torch.nn.Module:
    """Load a LoRA written by :func:`save_lora` (or any diffusers-format HunyuanVideo LoRA) into the DiT. ``path``:
    a folder, or a hub repo id (from the local Hugging Face cache, or downloaded), as editors load.

    Raises :class:`CheckpointError` when the folder holds no LoRA or its modules/shapes do not match.
    """
    from pathlib import Path

    from .model import _resolve

    if not Path(path).exists():
        path = _resolve(path, "pytorch_lora_weights.safetensors")
    path = Path(path)
    if not (path / "pytorch_lora_weights.safetensors").is_file():
        raise CheckpointError(f"{path}: no LoRA here (expected pytorch_lora_weights.safetensors)")
    from safetensors.torch import load_file

    state = load_file(str(path / "pytorch_lora_weights.safetensors"))
    modules = dict(transformer.named_modules())
    for key, value in state.items():
        name = key.removeprefix("transformer.").rsplit(".lora_", 1)[0]
        mod = modules.get(name)
        if mod is None or not hasattr(mod, "weight"):
            raise CheckpointError(f"{path}: the LoRA does not match the model (no module '{name}')")
        in_f, out_f = mod.weight.shape[1], mod.weight.shape[0]
        if (".lora_A." in key and value.shape[1] != in_f) or (".lora_B." in key and value.shape[0] != out_f):
            raise CheckpointError(f"{path}: the LoRA does not match the model ('{name}' has weight "
                                  f"{tuple(mod.weight.shape)}, LoRA {tuple(value.shape)})")
    try:
        transformer.load_lora_adapter(str(path), prefix="transformer", adapter_name=adapter_name,
                                      weight_name="pytorch_lora_weights.safetensors")
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise CheckpointError(f"{path}: the LoRA does not match the model ({str(exc).splitlines()[0][:200]})") from None
    return transformer
