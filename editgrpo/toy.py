"""The toy-world chain behind ``python -m editgrpo.train recipe=recipes/toy.yaml``.

Builds what the Edit-GRPO recipe needs and is missing, each stage cached in ``output_dir`` so a rerun
skips finished stages:

1. toy data (``output_dir/data``): SFT pairs (simple single-op videos + image pairs), GRPO compound
   prompts (no targets) and held-out eval prompts with their true targets and masks;
2. the toy reward model (``output_dir/reward_model``): a small open_clip CLIP trained contrastively on
   toy frames and captions; every reward whose ``model`` is ``"toy"`` uses it;
3. the SFT'd toy editor (``output_dir/sft/final``) through the SFT recipe (``toy.sft_recipe``).

It then points the GRPO recipe at them (``model.pretrained``, ``data.manifest``, ``eval.manifest``).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

from omegaconf import OmegaConf

logger = logging.getLogger(__name__)


def prepare(cfg, accelerator=None):
    """Run the missing stages (main process first) and return the GRPO config pointing at them."""
    t = cfg.toy
    out = Path(cfg.output_dir)
    main = accelerator is None or accelerator.is_main_process
    ctx = accelerator.main_process_first() if accelerator is not None else nullcontext()
    with ctx:
        from viva_base.data.toy import ensure_toy_dataset

        paths = ensure_toy_dataset(out / "data", seed=t.seed, n_sft_video=t.n_sft_video, n_sft_image=t.n_sft_image,
                                   n_grpo=t.n_grpo, n_eval_compound=t.n_eval_compound, n_eval_simple=t.n_eval_simple,
                                   frames=t.frames, size=t.size)
        reward_name = None
        if _uses_toy_reward(cfg.rewards):
            from .toy_reward import train_toy_clip

            kw = {"steps": t.reward_steps} if t.reward_steps else {}
            if t.reward_degrade:
                kw["degrade"] = t.reward_degrade
            reward_name = train_toy_clip(out / "reward_model", seed=t.seed, frames=t.frames, size=t.size, **kw)
        sft_final = out / "sft" / "final"
        if main:
            fingerprint = _sft_stage(t, out / "sft", paths["sft"], cfg.report_to)
        else:  # the main process built it (main_process_first)
            import json

            fingerprint = stage_fingerprint(json.loads((out / "sft" / SFT_STAGE).read_text()))
    cfg = OmegaConf.merge(cfg, {})  # a copy
    cfg.model.pretrained, cfg.model.tiny = str(sft_final), False
    cfg.toy.sft_fingerprint = fingerprint  # part of the recipe a GRPO checkpoint records: a new SFT editor is a new run
    cfg.data.manifest = str(paths["grpo"])
    cfg.eval.manifest = str(paths["eval"])
    for name, entry in cfg.rewards.items():
        if isinstance(entry, dict) or OmegaConf.is_dict(entry):
            if reward_name and entry.get("model") == "toy":
                entry["model"] = reward_name
            if entry.get("manifest") == "toy":  # toy_oracle (the diagnostic upper bound) on the chain's prompts
                entry["manifest"] = [str(paths["grpo"]), str(paths["eval"])]
    if main and not (out / "sft" / DIAGNOSTICS).exists():
        write_sft_diagnostics(cfg, paths, out / "sft" / DIAGNOSTICS)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return cfg


DIAGNOSTICS = "diagnostics.json"


def write_sft_diagnostics(cfg, paths: dict, dest: Path, *, n_pairs: int = 48, groups: int = 8) -> dict:
    """``editgrpo.diagnose``'s two measurements of the SFT editor, for the report: the clean-latent error in
    and outside the edit region per sigma on ``n_pairs`` of its own training video pairs, and the within-group
    spread of G = ``train.num_generations`` SDE samples (the recipe's sampler and rewards; oracle from the targets)
    on ``groups`` held-out simple prompts."""
    import json

    from editgrpo.diagnose import clean_latent_errors, group_spread
    from rewards.registry import CombinedReward
    from viva_base.data.manifest import read_manifest
    from viva_base.recipe import atomic_write_text
    from viva_base.training import load_editor

    editor = load_editor(cfg.model.pretrained)
    pairs = [r for r in read_manifest(paths["sft"], "pairs") if not r.get("reference")][:n_pairs]
    evals = [r for r in read_manifest(paths["eval"], "eval") if r.get("split") == "simple"] or \
        read_manifest(paths["eval"], "eval")
    sc = cfg.sampling
    window = (0, sc.sde_window_size) if sc.sde_window_size else None
    result = {"clean_latent": clean_latent_errors(editor, pairs),
              "group_spread": group_spread(editor, evals, groups=groups, group_size=cfg.train.num_generations,
                                           num_steps=sc.num_steps, guidance_scale=sc.guidance_scale, method=sc.method,
                                           eta=sc.eta, sde_window=window, reward_fn=CombinedReward.from_config(cfg.rewards))}
    atomic_write_text(dest, json.dumps(result, indent=2))
    return result


SFT_STAGE = "stage.json"


def _sft_stage(t, sft_dir: Path, manifest, report_to: str) -> str:
    """The SFT stage, cached by what produced it: ``sft_dir/stage.json`` holds the resolved SFT recipe (less
    output_dir, report_to and resume) of the editor in ``sft_dir/final``. The same recipe reuses it; another one
    resumes the SFT run from its last checkpoint, which continues it where only ``train.max_steps`` grew and is
    refused with one line naming the keys otherwise (viva_base.training.check_resume_config)."""
    import json

    from viva_base.recipe import atomic_write_text, load_recipe
    from viva_base.sft import SFTConfig
    from viva_base.sft import main as sft_main
    from viva_base.training import resume_config

    sft_cfg = load_recipe(SFTConfig, [f"recipe={t.sft_recipe}", f"output_dir={sft_dir}", f"data.manifest={manifest}",
                                      f"report_to={report_to}", "resume=latest", *t.sft_overrides])
    want = json.loads(json.dumps({**resume_config(sft_cfg), "train.max_steps": sft_cfg.train.max_steps}, default=str))
    stage = sft_dir / SFT_STAGE
    if (sft_dir / "final" / "editor_config.json").exists() and stage.exists() and json.loads(stage.read_text()) == want:
        logger.info("toy chain: reusing the SFT editor in %s (same recipe)", sft_dir / "final")
        return stage_fingerprint(want)
    if stage.exists():
        logger.info("toy chain: the SFT recipe changed since %s was built; resuming it with the new one", sft_dir)
    for stale in (stage, sft_dir / DIAGNOSTICS):
        stale.unlink(missing_ok=True)
    sft_main(sft_cfg)
    atomic_write_text(stage, json.dumps(want, indent=1))
    return stage_fingerprint(want)


def stage_fingerprint(config: dict) -> str:
    """A short hash of a stage's resolved recipe (what the GRPO run records as ``toy.sft_fingerprint``)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _uses_toy_reward(rewards) -> bool:
    return any((OmegaConf.is_dict(e) or isinstance(e, dict)) and e.get("model") == "toy" for e in rewards.values())
