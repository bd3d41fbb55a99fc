"""The Edit-GRPO recipe's schema (``python -m editgrpo.train recipe=... key=value``).

Field names follow trl's ``GRPOConfig`` where they mean the same thing (``num_generations``, ``beta``,
``epsilon``, ``scale_rewards``, ``learning_rate``, ``max_grad_norm``). Every value a recipe may set is
here, typed; an unknown key is an error naming the closest valid one (viva_base.recipe).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from viva_base.hub import HubConfig
from viva_base.training import ModelConfig


@dataclass
class DataConfig:
    manifest: Optional[str] = None       # a prompts manifest (viva_base/data/manifest.py); None -> toy prompts
    frames: Optional[int] = None         # cut source clips to this many frames
    size: Optional[list[int]] = None     # resize source frames to [H, W]
    toy_seed: int = 0                    # when manifest is None: toy-world prompts generated into output_dir/data
    toy_prompts: int = 8                 # toy-world prompts generated when manifest is None
    toy_frames: int = 9                  # frames of those toy clips (4k+1)
    toy_size: int = 32                   # side in pixels of those toy clips (multiple of 16)


@dataclass
class SamplingConfig:
    num_steps: int = 16                  # denoising steps of a rollout
    guidance_scale: float = 2.0          # CFG on the instruction only (paper: 2.0)
    guidance_interval: Optional[list[float]] = None  # [lo, hi]: CFG only where lo < sigma <= hi (else w = 1); None -> every step
    method: str = "flow_sde"             # flow_sde | cps | ode (deterministic rollouts: train.algorithm nft / awm only)
    eta: float = 0.7                     # SDE noise level
    log_prob: str = "exact"              # exact: Gaussian log-density | unscaled: -(x - mean)^2 (Flow-GRPO's CPS)
    shift: Optional[float] = None        # schedule shift; None -> the editor's
    sde_window_size: Optional[int] = None   # SDE on a window of this many steps (ODE elsewhere); None -> all steps
    sde_window_range: Optional[list[int]] = None  # [lo, hi] of the window start; None -> any valid start
    train_steps: Optional[int] = None    # train this many of the SDE steps (random subset); None -> all of them
    rollout_batch_size: Optional[int] = None  # samples per sampling forward; None -> num_generations
    share_prefix: bool = False           # a group's samples share their initial noise and the ODE steps before the SDE window, computed once per prompt


@dataclass
class LoraConfig:
    rank: int = 64                       # paper: r = 64
    alpha: int = 128                     # paper: alpha = 128
    init: str = "gaussian"               # paper: gaussian init
    targets: Optional[str] = None        # peft target_modules; None -> the editor's lora_targets (self/cross attn)


@dataclass
class TrainConfig:
    seed: int = 0                        # seeds noise, prompt order and LoRA init (same seed, same run)
    algorithm: str = "grpo"              # grpo: SDE log-prob ratios (eq. 13) | nft: DiffusionNFT | awm: advantage-weighted matching (docs/algorithms.md)
    forward_timesteps: int = 2           # nft / awm: noise levels each rollout's x0 is re-noised at per iteration (a forward + backward each)
    nft_beta: float = 1.0                # nft: step of the implicit policies v+- = v_old +- b (v - v_old)
    cfg_free: bool = False               # nft / awm: train the conditional velocity only (no CFG in the training forwards)
    num_iterations: int = 100            # rollout + update rounds
    prompts_per_iteration: int = 2       # global, over all processes
    num_generations: int = 4             # G, samples per prompt
    learning_rate: float = 1e-4          # AdamW on the LoRA (paper: 1e-4)
    adam_beta1: float = 0.9              # AdamW betas
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4           # AdamW weight decay
    lr_scheduler: str = "constant"       # a diffusers get_scheduler name (constant, cosine, linear, ...)
    warmup_steps: int = 0                # optimizer steps of linear warmup
    max_grad_norm: float = 1.0           # gradient clipping (0: none, as DeepSpeed reads it)
    epsilon: float = 1e-4                # clip range of the ratio (Flow-GRPO: 1e-4)
    beta: float = 0.004                  # KL weight to the reference policy (adapter disabled): grpo on kl_type's scale; nft / awm mean (v - v_ref)^2
    kl_type: str = "exact"               # exact: true step-Gaussian KL | flow_grpo: Flow-GRPO's (= exact x |dt|, Flow-SDE)
    cfg_grad: str = "full"               # full: grad through both CFG branches | cond_only: uncond detached (Flow-GRPO)
    scale_rewards: str = "group"         # group | global | none (eq. 11's std)
    reward_normalization: str = "total"  # total: eq. 11 on the weighted sum | component: per reward, then weighted
    advantage_eps: float = 1e-4          # added to the std in eq. 11 (a group of equal rewards gets advantage 0)
    advantage_clip: Optional[float] = 5.0   # advantages clipped to [-c, c]; None: no clipping
    num_inner_epochs: int = 1            # passes over an iteration's samples; > 1: reshuffled across minibatches each
    minibatches_per_iteration: int = 1   # optimizer steps per inner epoch (1: fully on-policy)
    train_batch_size: Optional[int] = None   # samples per training forward; None -> rollout_batch_size
    mixed_precision: str = "no"          # no | bf16 | fp16 (accelerate autocast; trained weights stay float32)
    compile: str = "none"                # none | full (torch.compile the whole DiT) | regional (each repeated block)
    fused_optimizer: bool = False        # AdamW's fused kernel (torch's fused=True; CPU or GPU)
    overlap_rewards: bool = False        # decode + score each rollout chunk on a thread while the next samples (same numbers)
    checkpoint_every: int = 10           # iterations between checkpoints (resume: latest continues from the last)
    keep_checkpoints: int = 3            # older checkpoints are deleted
    log_every: int = 1                   # iterations between logged metric rows


@dataclass
class EvalConfig:
    manifest: Optional[str] = None       # an eval manifest; None -> no evaluation
    every: int = 0                       # evaluate every k iterations (0: only at the end)
    at_start: bool = True                # evaluate the starting policy too (the baseline row)
    num_steps: int = 16                  # ODE steps
    guidance_scale: float = 2.0          # CFG on the instruction (paper: 2.0)
    guidance_interval: Optional[list[float]] = None  # [lo, hi]: CFG only where lo < sigma <= hi; None -> every step
    shift: Optional[float] = None        # schedule shift of the evaluation sampler; None -> the editor's
    seeds: list[int] = field(default_factory=lambda: [1234, 1235, 1236])  # noise seeds; scores are averaged
    max_items: Optional[int] = None      # evaluate only the first N items (None: all)
    batch_size: int = 8                  # items edited per forward
    save_videos: int = 8                 # write this many items' edited clips per evaluation


@dataclass
class ToyChainConfig:
    """``toy.enabled``: build the toy world, its reward model and the SFT'd toy editor first (editgrpo/toy.py)."""

    enabled: bool = False                # run the toy chain's stages before Edit-GRPO (recipes/toy.yaml)
    seed: int = 0                        # toy-world seed (scenes, instructions, splits)
    frames: int = 9                      # frames per toy clip (4k+1)
    size: int = 32                       # side of a toy frame in pixels (multiple of 16)
    n_sft_video: int = 2000              # video SFT pairs
    n_sft_image: int = 1000              # 1-frame image SFT pairs (replace is image-only)
    n_sft_compound_video: int = 0        # compound video SFT pairs of the seen combos (held-out combos: never)
    n_sft_compound_image: int = 0        # compound 1-frame SFT pairs of the seen combos
    sft_noop_clause: float = 0.0         # probability a simple SFT instruction gets a no-op phrase ("leave the
                                         # background unchanged") before or after its edit (docs/toy_world.md)
    n_grpo: int = 256                    # compound GRPO prompts (no targets)
    n_eval_compound: int = 64            # held-out compound eval prompts (half novel combinations)
    n_eval_simple: int = 64              # held-out single-edit eval prompts
    open_place: float = 0.0              # probability an add leaves its place open: several correct edits (docs/toy_world.md)
    grpo_types: Optional[list[str]] = None         # GRPO prompts: simple ones of these edit types; None -> compound combos
    eval_simple_types: Optional[list[str]] = None  # edit types of the simple eval prompts; None -> all five
    reward_steps: Optional[int] = None   # toy CLIP training steps; None -> its default
    reward_degrade: float = 0.0          # toy CLIP: probability of a damaged-copy quality negative per pair
    instructor_steps: int = 1500         # pretrain the tiny instructor to read instructions (viva_base/toy_instructor.py); 0: random
    instructor_compound: int = 0         # + text-only compound instructions (seen combos) the instructor reads
    sft_recipe: str = "recipes/sft_toy.yaml"   # the SFT stage's recipe
    sft_overrides: list[str] = field(default_factory=list)   # key=value overrides of that recipe (a change retrains)
    sft_fingerprint: Optional[str] = None  # set by the chain: the hash of the SFT stage's recipe (resume checks it)


@dataclass
class GRPOConfig:
    output_dir: str = "outputs/grpo"     # checkpoints, logs, eval videos and report land here
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # reward name -> {weight: w, ...kwargs} (rewards/registry.py; docs/rewards.md). A recipe's rewards block is
    # the whole set (it replaces this default, RECIPE_REPLACE); key=value overrides add to or change it
    rewards: Any = field(default_factory=lambda: {"clip_if": {"weight": 1.0}, "clip_sp": {"weight": 1.0}})  # name: {weight, kwargs}
    eval: EvalConfig = field(default_factory=EvalConfig)
    toy: ToyChainConfig = field(default_factory=ToyChainConfig)
    report_to: str = "tensorboard"       # tensorboard | wandb (offline without a key) | none
    resume: Optional[str] = None         # latest | a checkpoint folder
    hub: HubConfig = field(default_factory=HubConfig)  # model card and upload of lora/ (viva_base/hub.py)

    RECIPE_REPLACE = ("rewards",)  # merged with the default, `rewards: {pickscore: ...}` once also trained on clip_if + clip_sp


MIXED_PRECISION = ("no", "fp16", "bf16")


def check_toy_sft_recipe(toy, *, tools: bool = True):
    """The toy chain's SFT stage recipe (``toy.sft_recipe`` + ``toy.sft_overrides``) checked as ``viva_base.sft``
    checks it, before the data, toy CLIP and instructor stages (minutes) rather than after them. The data manifest
    and the starting editor, which the chain fills in later, are left as the recipe has them. ``tools=False``: its
    values only (``check_sft_values``); returns the loaded ``SFTConfig`` for ``check_toy_sft_tools``."""
    from viva_base.errors import UserError
    from viva_base.recipe import RecipeError, load_recipe, resolve_recipe_path
    from viva_base.sft import SFTConfig
    from viva_base.sft_checks import check_sft_values

    try:
        resolve_recipe_path(toy.sft_recipe)
    except RecipeError:
        raise UserError(f"toy.sft_recipe={toy.sft_recipe!r}: no such file") from None
    try:
        sft = load_recipe(SFTConfig, [f"recipe={toy.sft_recipe}", *toy.sft_overrides])
        check_sft_values(sft)
    except (RecipeError, UserError) as e:
        raise UserError(f"toy.sft_recipe / toy.sft_overrides: {e}") from None
    if tools:
        check_toy_sft_tools(sft)
    return sft


def check_toy_sft_tools(sft) -> None:
    """``check_sft_tools`` for the toy chain's SFT stage, its errors named as ``check_toy_sft_recipe`` names them."""
    from viva_base.errors import UserError
    from viva_base.sft_checks import check_sft_tools

    try:
        check_sft_tools(sft)
    except UserError as e:
        raise UserError(f"toy.sft_recipe / toy.sft_overrides: {e}") from None


def check_eval_values(ec: EvalConfig) -> None:
    """The ``eval.*`` values (used when ``eval.manifest`` is set, or by the toy chain), as UserErrors naming the key:
    a value no evaluation can use fails before the run, not at its first evaluation (after the editor, the reward
    models and possibly the whole training)."""
    from viva_base.errors import UserError
    from viva_base.guidance import check_sampler_options
    from viva_base.recipe import check_positive as positive

    for key in ("num_steps", "guidance_scale", "max_items", "batch_size"):
        positive(f"eval.{key}", getattr(ec, key))
    for key in ("every", "save_videos"):
        positive(f"eval.{key}", getattr(ec, key), strict=False)
    if not ec.seeds:
        raise UserError("eval.seeds=[]: give at least one noise seed (the scores are averaged over them)")
    if len(set(ec.seeds)) != len(ec.seeds):
        raise UserError(f"eval.seeds={list(ec.seeds)}: a seed given twice counts its samples twice; give distinct "
                        "seeds")
    check_sampler_options(ec.guidance_interval, ec.shift, interval_name="eval.guidance_interval",
                          shift_name="eval.shift")


def check_data_values(dc: DataConfig, *, chain: bool = False) -> None:
    """The ``data.*`` values: the clip setting (``frames`` > 0, ``size`` ``[H, W]``), and without a manifest the toy
    prompts generated in its place (not in the toy chain, ``chain=True``, which writes its own manifests)."""
    from viva_base.recipe import check_positive as positive
    from viva_base.recipe import check_size

    positive("data.frames", dc.frames)
    check_size("data.size", dc.size)
    if not chain and dc.manifest is None:
        from viva_base.data.toyworld.build import check_geometry

        positive("data.toy_prompts", dc.toy_prompts)
        check_geometry(dc.toy_frames, dc.toy_size, prefix="data.toy_")


def check_toy_chain_values(toy: ToyChainConfig) -> None:
    """The toy chain's own values (``toy.*``): its clips, its counts (SFT pairs, GRPO prompts and held-out prompts,
    each stage needs some) and its stages' settings, before the first stage rather than at the stage that uses them
    (the toy CLIP's after the data, the instructor's after the toy CLIP: minutes)."""
    from viva_base.data.toyworld.build import check_geometry
    from viva_base.errors import UserError
    from viva_base.recipe import check_fraction
    from viva_base.recipe import check_positive as positive

    check_geometry(toy.frames, toy.size, prefix="toy.")
    for key in ("n_sft_video", "n_sft_image", "n_sft_compound_video", "n_sft_compound_image", "n_eval_compound",
                "n_eval_simple", "instructor_steps", "instructor_compound"):
        positive(f"toy.{key}", getattr(toy, key), strict=False)
    positive("toy.n_grpo", toy.n_grpo)
    positive("toy.reward_steps", toy.reward_steps)  # (None: the toy CLIP's default)
    if not toy.n_sft_video + toy.n_sft_image + toy.n_sft_compound_video + toy.n_sft_compound_image:
        raise UserError("toy.n_sft_video + n_sft_image + the compound counts must be > 0 (no SFT pairs)")
    if not toy.n_eval_compound + toy.n_eval_simple:
        raise UserError("toy.n_eval_compound + toy.n_eval_simple must be > 0 (the report compares the editors on "
                        "held-out prompts)")
    for key in ("sft_noop_clause", "reward_degrade"):
        check_fraction(f"toy.{key}", getattr(toy, key))


def check_manifests(cfg: GRPOConfig) -> None:
    """``data.manifest`` (prompts) and ``eval.manifest`` read as the run reads them, every file they name present: a
    bad line or a missing clip is one UserError naming the key, before anything is built or written."""
    from viva_base.data.manifest import check_manifest

    if cfg.data.manifest is not None:
        check_manifest("data.manifest", cfg.data.manifest, "prompts")
    if cfg.eval.manifest:
        check_manifest("eval.manifest", cfg.eval.manifest, "eval")


def validate_config(cfg: GRPOConfig) -> None:
    """Check every value that can be checked without building anything (no data, model or reward is loaded),
    so a mistyped value fails in seconds, before any expensive work. Raises ``UserError`` (one line)."""
    from viva_base.errors import UserError
    from viva_base.guidance import check_sampler_options
    from viva_base.recipe import check_one_of as one_of
    from viva_base.recipe import check_output_dir
    from viva_base.recipe import check_positive as positive
    from viva_base.training import COMPILE_MODES, DTYPES, check_compile, check_lr_scheduler

    from .grpo import ADVANTAGE_SCALES, ALGORITHMS, FORWARD_ALGORITHMS, KL_TYPES
    from .sampling import CFG_GRADS, LOG_PROB_KINDS, ROLLOUT_METHODS

    tc, sc = cfg.train, cfg.sampling

    one_of("train.reward_normalization", tc.reward_normalization, ("total", "component"))
    one_of("train.scale_rewards", tc.scale_rewards, ADVANTAGE_SCALES)
    one_of("train.kl_type", tc.kl_type, KL_TYPES)
    one_of("train.mixed_precision", tc.mixed_precision, MIXED_PRECISION)
    one_of("train.compile", tc.compile, COMPILE_MODES)
    one_of("train.algorithm", tc.algorithm, ALGORITHMS)
    one_of("sampling.method", sc.method, ROLLOUT_METHODS)
    if sc.method == "ode" and tc.algorithm not in FORWARD_ALGORITHMS:
        raise UserError(f"sampling.method=ode with train.algorithm={tc.algorithm}: GRPO trains SDE log-probs; use "
                        f"flow_sde or cps, or train.algorithm=nft / awm (no log-probs)")
    if tc.algorithm == "nft" and tc.advantage_clip is None:
        raise UserError("train.algorithm=nft needs train.advantage_clip (its optimality probability is "
                        "A / (2 advantage_clip) + 1/2)")
    one_of("sampling.log_prob", sc.log_prob, LOG_PROB_KINDS)
    one_of("train.cfg_grad", tc.cfg_grad, CFG_GRADS)
    one_of("model.dtype", cfg.model.dtype, sorted(DTYPES))
    if not cfg.toy.enabled:  # (the toy chain's model is its SFT stage's, filled in by the chain)
        from viva_base.training import check_model_config

        check_model_config(cfg.model)
    for key in ("num_iterations", "prompts_per_iteration", "num_generations", "learning_rate", "num_inner_epochs",
                "minibatches_per_iteration", "train_batch_size", "advantage_clip", "log_every", "forward_timesteps",
                "nft_beta"):
        positive(f"train.{key}", getattr(tc, key))
    for key in ("beta", "warmup_steps", "max_grad_norm", "advantage_eps", "weight_decay", "checkpoint_every"):
        positive(f"train.{key}", getattr(tc, key), strict=False)
    if not 0 < tc.epsilon < 1:
        raise UserError(f"train.epsilon={tc.epsilon!r}: the clip range must be in (0, 1)")
    for key in ("num_steps", "eta", "rollout_batch_size", "train_steps", "sde_window_size", "shift"):
        positive(f"sampling.{key}", getattr(sc, key))
    if sc.method == "cps" and sc.eta > 1:
        raise UserError(f"sampling.eta={sc.eta!r}: CPS needs 0 < eta <= 1 (std = sigma_next sin(eta pi / 2))")
    if sc.share_prefix and sc.method == "ode":
        raise UserError("sampling.share_prefix=true with sampling.method=ode: an ODE rollout is one deterministic "
                        "prefix, so every sample of a group would be the same; use flow_sde or cps, or share_prefix=false")
    positive("sampling.guidance_scale", sc.guidance_scale)
    check_sampler_options(sc.guidance_interval, interval_name="sampling.guidance_interval")
    check_eval_values(cfg.eval)
    check_data_values(cfg.data, chain=cfg.toy.enabled)
    if sc.sde_window_size and sc.sde_window_size > sc.num_steps - 1:
        raise UserError(f"sampling.sde_window_size={sc.sde_window_size} must be at most num_steps - 1 = "
                        f"{sc.num_steps - 1} (the last step to sigma 0 is always an ODE step)")
    positive("lora.rank", cfg.lora.rank)
    positive("lora.alpha", cfg.lora.alpha)  # (0: the adapter's output is scaled to nothing, so it never trains)
    positive("model.shift", cfg.model.shift)
    positive("train.keep_checkpoints", tc.keep_checkpoints, strict=False)
    for key in ("adam_beta1", "adam_beta2"):  # (AdamW refuses others, after the editor was built)
        if not 0 <= getattr(tc, key) < 1:
            raise UserError(f"train.{key}={getattr(tc, key)!r} must be in [0, 1)")
    from viva_base.hub import check_hub

    check_hub(cfg.hub, cfg.output_dir, create=False)  # offline, token, repo id: no network yet
    check_output_dir("output_dir", cfg.output_dir)
    if cfg.toy.enabled:
        from viva_base.data.toyworld.build import check_open_edit_params

        check_open_edit_params(cfg.toy.open_place, cfg.toy.grpo_types, cfg.toy.eval_simple_types, prefix="toy.")
        check_toy_chain_values(cfg.toy)
        sft = check_toy_sft_recipe(cfg.toy, tools=False)
    from rewards.registry import UnknownRewardError, check_rewards_config

    try:
        check_rewards_config(cfg.rewards)
    except UnknownRewardError as e:
        raise UserError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    if not cfg.toy.enabled:  # the manifests a run reads, as it reads them (the toy chain writes its own)
        check_manifests(cfg)
    # last, the checks that cost a subprocess or an import of diffusers (1-2 s): a mistyped value fails before them
    check_compile(tc.compile)
    check_lr_scheduler(tc.lr_scheduler)
    if cfg.toy.enabled:
        check_toy_sft_tools(sft)
