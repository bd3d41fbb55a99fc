"""Early checks of the SFT recipe (``python -m viva_base.sft``): every value that can be checked without building
anything (no data, editor or accelerator), so that a mistyped value fails in about a second with one line
(``UserError``, exit code 2), not after the data and the editor were built. The SFT counterpart of
``editgrpo.config.validate_config``.

Where the code that uses a value decides what it accepts (timestep sampling, loss weighting, the lr schedule),
the check asks that code rather than repeating its list, so the two cannot disagree.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError

MIXED_PRECISION = ("no", "fp16", "bf16")
TRAINABLE = ("full", "lora", "projector_refiner")


def validate_sft_config(cfg) -> None:
    """Check an ``SFTConfig`` (viva_base.sft) before any expensive work. Raises ``UserError`` naming the key.

    The values first, then the tools they need (``check_sft_tools``: a C++ compiler, diffusers' schedule names), which
    cost a subprocess or an import of 1-2 s: a mistyped value fails before paying for them."""
    check_sft_values(cfg)
    check_sft_tools(cfg)


def check_sft_tools(cfg) -> None:
    """The checks of ``validate_sft_config`` that need more than the recipe: ``torch.compile``'s C++ compiler on a CPU,
    and ``train.lr_scheduler`` among the names diffusers' ``get_scheduler`` knows (importing diffusers)."""
    from .training import check_compile, check_lr_scheduler

    check_compile(cfg.train.compile)
    check_lr_scheduler(cfg.train.lr_scheduler)


def check_sft_values(cfg) -> None:
    """The checks of ``validate_sft_config`` that read the recipe (and the files it names) only."""
    import torch

    from .losses import sample_sigmas
    from .recipe import check_one_of as one_of
    from .recipe import check_output_dir
    from .recipe import check_fraction as probability
    from .recipe import check_positive as positive
    from .recipe import check_size
    from .training import DTYPES

    tc, dc, mc = cfg.train, cfg.data, cfg.model

    # the editor: exactly one source, a known dtype and tiny kind (build_editor's rules, before building anything)
    one_of("model.dtype", mc.dtype, sorted(DTYPES))
    if sum([bool(mc.pretrained), bool(mc.t2v_base or mc.instructor), bool(mc.tiny)]) != 1:
        raise UserError("set exactly one of model.pretrained, model.t2v_base (+ model.instructor), or model.tiny=true")
    from .training import check_model_config

    check_model_config(mc)
    if (mc.t2v_base or mc.instructor) and not (mc.t2v_base and mc.instructor):
        raise UserError("model.t2v_base and model.instructor go together (a HunyuanVideo and a LLaVA checkpoint)")
    positive("model.shift", mc.shift)
    kind = _editor_class(mc)
    if kind not in (None, "VivaEditor"):
        key = "model.tiny_kind" if mc.tiny else "model.pretrained"
        raise UserError(f"{key}: a {kind}; viva_base.sft trains the VIVA editor (its projector and token refiner) "
                        "only: post-train Lucy-Edit with Edit-GRPO (recipes/lucy_grpo.yaml)")

    one_of("train.trainable", tc.trainable, TRAINABLE)
    one_of("train.mixed_precision", tc.mixed_precision, MIXED_PRECISION)
    from .training import COMPILE_MODES

    one_of("train.compile", tc.compile, COMPILE_MODES)
    try:
        sample_sigmas(1, method=tc.timestep_sampling)
    except ValueError:
        raise UserError(f"train.timestep_sampling={tc.timestep_sampling!r}: use logit_normal or uniform") from None
    weighting = getattr(tc, "loss_weighting", None)
    if weighting is not None:
        from . import losses

        try:
            losses.sigma_loss_weight(torch.ones(1), weighting, getattr(tc, "loss_weight_cap", 25.0))
        except ValueError as e:
            raise UserError(f"train.loss_weighting={weighting!r}: {e}") from None
    from .losses import MASK_NORMALIZATIONS

    one_of("train.mask_normalization", tc.mask_normalization, MASK_NORMALIZATIONS)
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate", "log_every", "shift"):
        positive(f"train.{key}", getattr(tc, key))
    for key in ("weight_decay", "warmup_steps", "max_grad_norm", "w_m", "checkpoint_every", "keep_checkpoints"):
        positive(f"train.{key}", getattr(tc, key), strict=False)
    for key in ("adam_beta1", "adam_beta2", "ema_decay"):
        if not 0 <= getattr(tc, key) < 1:
            raise UserError(f"train.{key}={getattr(tc, key)!r} must be in [0, 1)")
    probability("train.cfg_dropout", tc.cfg_dropout)
    probability("train.pooled_dropout", tc.pooled_dropout)
    if tc.batch_size % tc.gradient_accumulation_steps:  # (and of the processes: checked once they are known)
        raise UserError(f"train.batch_size={tc.batch_size} must be a multiple of train.gradient_accumulation_steps="
                        f"{tc.gradient_accumulation_steps}")
    if tc.trainable == "lora":
        positive("lora.rank", cfg.lora.rank)
        positive("lora.alpha", cfg.lora.alpha)
    from .hub import check_hub

    check_hub(cfg.hub, cfg.output_dir, create=False)  # offline, token, repo id: no network yet
    check_output_dir("output_dir", cfg.output_dir)
    from .validation import check_validation

    check_validation(cfg.validation)

    # the data
    probability("data.p_video", dc.p_video)
    positive("data.frames", dc.frames)
    positive("data.num_workers", dc.num_workers, strict=False)
    check_size("data.size", dc.size)
    if dc.manifest:
        if not Path(dc.manifest).is_file():
            raise UserError(f"data.manifest={dc.manifest!r}: no such file")
        from .data.manifest import check_manifest

        check_manifest("data.manifest", dc.manifest, "pairs")  # a bad line or a missing video, before config.yaml
    else:  # the toy world is generated
        from .data.toyworld.build import check_geometry

        t = dc.toy
        check_geometry(t.frames, t.size, prefix="data.toy.")
        for key in ("n_video", "n_image"):
            positive(f"data.toy.{key}", getattr(t, key), strict=False)
        if t.n_video + t.n_image == 0:
            raise UserError("data.toy.n_video + data.toy.n_image must be > 0 (no training pairs)")


def _editor_class(mc) -> str | None:
    """The editor class ``model.*`` builds, where that is known without loading anything: the tiny kind, or a local
    editor folder's (``training.editor_class_name``; None for a hub id: the trainer checks the editor it built)."""
    from .training import editor_class_name

    if mc.tiny:
        return {"viva": "VivaEditor", "lucy": "LucyEditor"}.get(mc.tiny_kind)
    if mc.t2v_base:
        return "VivaEditor"
    root = Path(mc.pretrained) if mc.pretrained else None
    return editor_class_name(root) if root is not None and root.is_dir() else None
