"""The toy-world chain behind ``python -m editgrpo.train recipe=recipes/toy.yaml``.

Builds what the Edit-GRPO recipe needs and is missing, each stage cached in ``output_dir`` so a rerun
skips finished stages:

1. toy data (``output_dir/data``): SFT pairs (simple single-op videos + image pairs), GRPO compound
   prompts (no targets) and held-out eval prompts with their true targets and masks;
2. the toy reward model (``output_dir/reward_model``): a small open_clip CLIP trained contrastively on
   toy frames and captions; every reward whose ``model`` is ``"toy"`` uses it;
3. the toy instructor (``output_dir/instructor``): the tiny LLaVA and CLIP text encoder pretrained to read toy
   instructions, then frozen (``viva_base/toy_instructor.py``; ``toy.instructor_steps: 0`` keeps them random);
4. the SFT'd toy editor (``output_dir/sft/final``) through the SFT recipe (``toy.sft_recipe``), started from the
   editor of stage 3.

It then points the GRPO recipe at them (``model.pretrained``, ``data.manifest``, ``eval.manifest``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

logger = logging.getLogger(__name__)


def prepare(cfg, accelerator=None):
    """Run the missing stages (main process first) and return the GRPO config pointing at them. The other processes
    wait for the main one by polling a file, not in a barrier: the SFT stage takes longer than gloo's 30-minute
    timeout on CPUs (``viva_base.training.main_process_first_polled``)."""
    from viva_base.training import main_process_first_polled

    t = cfg.toy
    out = Path(cfg.output_dir)
    main = accelerator is None or accelerator.is_main_process
    with main_process_first_polled(accelerator, out):
        paths, reward_name, base = shared_stages(cfg, out)  # the main process builds them, the others read them
        sft_final = out / "sft" / "final"
        if main:  # in a process of its own when this one is one of several (it would join their process group)
            fingerprint = _sft_stage(t, out / "sft", paths["sft"], cfg.report_to, base=base,
                                     processes=accelerator.num_processes if accelerator is not None else 1)
        else:  # the main process built it (main_process_first_polled)
            import json

            fingerprint = stage_fingerprint(json.loads((out / "sft" / SFT_STAGE).read_text()))
        cfg = point_at(cfg, paths, reward_name, sft_final, fingerprint)
        if main and not (out / "sft" / DIAGNOSTICS).exists():
            write_sft_diagnostics(cfg, paths, out / "sft" / DIAGNOSTICS)
    return cfg


def shared_stages(cfg, out: Path):
    """Stages 1-3 (data, toy reward model, toy instructor) in ``out``, each cached; what every SFT stage built on them
    shares. Returns ``(paths, reward_name, base)``: the manifests, the toy CLIP's name for the rewards (None when no
    reward uses it), and the pretrained toy instructor's ``(editor folder, fingerprint)`` (None when
    ``toy.instructor_steps`` is 0)."""
    t = cfg.toy
    from viva_base.data.toy import ensure_toy_dataset

    paths = ensure_toy_dataset(out / "data", seed=t.seed, n_sft_video=t.n_sft_video, n_sft_image=t.n_sft_image,
                               n_sft_compound_video=t.n_sft_compound_video,
                               n_sft_compound_image=t.n_sft_compound_image,
                               noop_clause=float(t.sft_noop_clause),
                               n_grpo=t.n_grpo, n_eval_compound=t.n_eval_compound, n_eval_simple=t.n_eval_simple,
                               frames=t.frames, size=t.size, open_place=float(t.open_place),
                               grpo_types=list(t.grpo_types) if t.grpo_types else None,
                               eval_simple_types=list(t.eval_simple_types) if t.eval_simple_types else None)
    reward_name = None
    if _uses_toy_reward(cfg.rewards):
        from .toy_reward import train_toy_clip

        kw = {"steps": t.reward_steps} if t.reward_steps else {}
        if t.reward_degrade:
            kw["degrade"] = t.reward_degrade
        reward_name = train_toy_clip(out / "reward_model", seed=t.seed, frames=t.frames, size=t.size, **kw)
    base = None
    if t.instructor_steps:
        base = _instructor_stage(t, out / "instructor", paths)
    return paths, reward_name, base


def point_at(cfg, paths: dict, reward_name, sft_final: Path, fingerprint: str):
    """A copy of the GRPO config pointed at the chain's stages: the SFT editor ``sft_final`` (``model.pretrained``),
    the GRPO and eval manifests, the toy CLIP for every reward whose ``model`` is ``"toy"`` and the chain's prompts
    for ``toy_oracle``."""
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


def _sft_recipe_args(t, sft_dir: Path, manifest, report_to: str, base=None) -> list[str]:
    """The SFT stage's recipe arguments; with the pretrained toy instructor (``base``: an editor folder whose DiT is
    the tiny random one) the SFT starts from that editor instead of a fresh tiny one."""
    # real paths: runs whose stages are links to one shared chain (benchmarks.toybench) record the same recipe
    start = ["model.tiny=false", f"model.pretrained={Path(base[0]).resolve()}"] if base is not None else []
    return [f"recipe={t.sft_recipe}", f"output_dir={sft_dir}", f"data.manifest={Path(manifest).resolve()}",
            f"report_to={report_to}",
            "resume=latest", *start, *t.sft_overrides]


def _instructor_stage(t, out: Path, paths: dict):
    """The pretrained toy instructor (viva_base/toy_instructor.py), for the SFT recipe's tiny editor; returns
    ``(editor folder, fingerprint)``."""
    from viva_base.recipe import load_recipe
    from viva_base.sft import SFTConfig

    from viva_base.toy_instructor import pretrain_toy_instructor

    sft = load_recipe(SFTConfig, [f"recipe={t.sft_recipe}", *t.sft_overrides])
    spec = OmegaConf.to_container(sft.model.tiny_spec) if OmegaConf.is_config(sft.model.tiny_spec) else \
        dict(sft.model.tiny_spec)
    manifests = [paths["sft"], paths["grpo"]]
    if t.instructor_compound:
        manifests.append(compound_instructions(out / "compound_instructions.jsonl", paths, t.instructor_compound))
    return pretrain_toy_instructor(out, manifests, spec, tiny_seed=sft.model.tiny_seed,
                                   seed=t.seed, heldout=paths["eval"], steps=t.instructor_steps)


def compound_instructions(path: Path, paths: dict, n: int) -> Path:
    """Write (once) ``n`` text-only compound instructions of the world's *seen* combos (``toy.instructor_compound``;
    docs/toy_world.md, fourteenth pass): otherwise only the GRPO prompts are compound (256 of the recipe's 9756
    training instructions), and the instructor parses 2% of held-out compound instructions right. Evaluation scenes
    are excluded; the file is rewritten only when what it depends on changed."""
    import json

    from viva_base.data.manifest import read_jsonl, write_manifest
    from viva_base.data.toyworld.build import instruction_records
    from viva_base.data.toyworld.pairs import scene_fingerprint
    from viva_base.data.toyworld.scene import scene_from_json
    from viva_base.recipe import atomic_write_text

    world = json.loads(Path(paths["world"]).read_text())
    key = {"seed": world["seed"], "n": n, "combos": world["grpo_combos"], "frames": world["frames"],
           "size": world["size"], "open_place": world.get("open_place", 0.0), "eval": Path(paths["eval"]).read_text()}
    stamp = path.with_suffix(".key.json")
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()) == key:
        return path
    exclude = frozenset(scene_fingerprint(scene_from_json(r["scene"])) for _, r in read_jsonl(paths["eval"]))
    recs = instruction_records(world["seed"], n, world["grpo_combos"], exclude, frames=world["frames"],
                               size=world["size"], open_place=float(world.get("open_place", 0.0)))
    write_manifest(path, recs)
    atomic_write_text(stamp, json.dumps(key))
    return path


def _sft_stage(t, sft_dir: Path, manifest, report_to: str, base=None, processes: int = 1) -> str:
    """The SFT stage, cached by what produced it: ``sft_dir/stage.json`` holds the resolved SFT recipe (less
    output_dir, report_to and resume) of the editor in ``sft_dir/final``. The same recipe reuses it; another one
    resumes the SFT run from its last checkpoint, which continues it where only ``train.max_steps`` grew and is
    refused with one line naming the keys otherwise (viva_base.training.check_resume_config). ``processes``: the
    processes of the launch; with more than one the SFT runs as ``python -m viva_base.sft`` in a process of its own
    (:func:`_sft_in_own_process`)."""
    import json

    from viva_base.recipe import atomic_write_text, load_recipe
    from viva_base.sft import SFTConfig
    from viva_base.sft import main as sft_main
    from viva_base.training import added_since, resume_config, resume_free

    sft_cfg = load_recipe(SFTConfig, _sft_recipe_args(t, sft_dir, manifest, report_to, base))
    want = json.loads(json.dumps({**resume_config(sft_cfg), "train.max_steps": sft_cfg.train.max_steps,
                                  "instructor": base[1] if base is not None else None}, default=str))
    stage = sft_dir / SFT_STAGE
    stored = json.loads(stage.read_text()) if stage.exists() else None
    # a stage written before one of its keys became resume-free (train.compile) still records it: not a change
    if (stored is not None and (sft_dir / "final" / "editor_config.json").exists()
            and {k: v for k, v in stored.items() if k in want or not resume_free(k)}
            == {k: v for k, v in want.items() if k not in added_since(stored, want)}):
        logger.info("toy chain: reusing the SFT editor in %s (same recipe)", sft_dir / "final")
        return stage_fingerprint(stored)  # the file's, as a non-main process and the GRPO checkpoints read it
    if stored is not None and stored.get("instructor") != want["instructor"]:
        import shutil

        logger.info("toy chain: the toy instructor changed since %s was built; training the SFT stage afresh", sft_dir)
        shutil.rmtree(sft_dir)
    elif stored is not None:
        logger.info("toy chain: the SFT recipe changed since %s was built; resuming it with the new one", sft_dir)
    for stale in (stage, sft_dir / DIAGNOSTICS):
        stale.unlink(missing_ok=True)
    if processes > 1:
        _sft_in_own_process(_sft_recipe_args(t, sft_dir, manifest, report_to, base), processes=processes)
    else:
        sft_main(sft_cfg)
    atomic_write_text(stage, json.dumps(want, indent=1))
    return stage_fingerprint(want)


DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                   "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                   "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "ACCELERATE_USE_DEEPSPEED")


def _sft_in_own_process(args: list[str], processes: int = 1) -> None:
    """``python -m viva_base.sft *args`` as one process outside the launch, the way a 1-process chain trains it (the
    same editor, so the stage is shared with 1-process runs), on ``processes`` times this process's torch threads (the
    waiting processes' cores). In-process, the main process of a multi-process launch would run the SFT inside the
    launch's process group while the other processes wait for the stage: its first collective would never be
    matched."""
    import os
    import subprocess
    import sys

    import torch

    from viva_base.errors import UserError

    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and not k.startswith("ACCELERATE_DEEPSPEED")}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads() * processes)
    code = subprocess.run([sys.executable, "-m", "viva_base.sft", *args], env=env).returncode
    if code != 0:
        raise UserError(f"the toy chain's SFT stage stopped (exit {code}; its output is above); rerun to resume it")


def stage_fingerprint(config: dict) -> str:
    """A short hash of a stage's resolved recipe (what the GRPO run records as ``toy.sft_fingerprint``)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _uses_toy_reward(rewards) -> bool:
    return any((OmegaConf.is_dict(e) or isinstance(e, dict)) and e.get("model") == "toy" for e in rewards.values())
