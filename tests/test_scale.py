"""Scale: the 13B recipes, the DeepSpeed configs (DeepSpeed's own config classes) and what the recipes fill in,
resuming under DeepSpeed, the scaling plan's counting (Edit-GRPO and the SFT's full fine-tuning)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ACC = REPO / "recipes" / "accelerate"


# ---------------------------------------------------------------------------- recipes/viva.yaml
def test_viva_recipe_loads_with_the_paper_values():
    from editgrpo.config import GRPOConfig
    from viva_base.recipe import load_recipe

    cfg = load_recipe(GRPOConfig, [f"recipe={REPO / 'recipes' / 'viva.yaml'}"])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init) == (64, 128, "gaussian")
    assert cfg.sampling.guidance_scale == 2.0 and cfg.sampling.method == "flow_sde"
    assert set(cfg.rewards) == {"clip_if", "clip_sp", "pickscore"}
    assert cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing and cfg.train.mixed_precision == "bf16"
    frames, (h, w) = cfg.data.frames, cfg.data.size
    assert (frames - 1) % 4 == 0 and h % 16 == 0 and w % 16 == 0  # what the Hunyuan VAE and patching need


def test_every_viva_recipe_value_names_its_source():
    """Each leaf value of recipes/viva.yaml carries [paper], [Flow-GRPO] or [ours] in its comment."""
    text = (REPO / "recipes" / "viva.yaml").read_text().splitlines()
    leaves = [ln for ln in text if re.match(r"^\s*[a-z_0-9]+:\s*\S", ln) and not ln.strip().startswith("#")]
    assert len(leaves) > 30
    unsourced = [ln for ln in leaves if not re.search(r"#.*\[(paper|Flow-GRPO|ours)\]", ln)]
    assert not unsourced, unsourced


# ---------------------------------------------------------------------------- DeepSpeed configs
def _fake_accelerator(ds: dict | None, world: int = 2, stage: int | None = None):
    """Just what viva_base.distributed reads of an accelerator: processes, the DeepSpeed config and stage (None: no
    DeepSpeed)."""
    plugin = None if ds is None else SimpleNamespace(deepspeed_config=ds, zero_stage=stage)
    return SimpleNamespace(num_processes=world, state=SimpleNamespace(deepspeed_plugin=plugin))


def _filled(stage_file: str, world: int, micro: int, accumulation: int, bf16: bool) -> dict:
    """A ds_*.json with its "auto" keys filled as the trainer (and accelerate, for bf16) fill them."""
    from viva_base.distributed import configure_deepspeed as _configure_deepspeed

    ds = json.loads((ACC / f"ds_{stage_file}.json").read_text())
    _configure_deepspeed(_fake_accelerator(ds, world), micro_batch=micro, accumulation=accumulation, clip=1.0)
    assert ds["bf16"]["enabled"] == "auto"
    ds["bf16"]["enabled"] = bf16  # accelerate: from the recipe's train.mixed_precision
    return ds


@pytest.mark.parametrize("stage_file,stage,offload", [("zero2", 2, None), ("zero3", 3, None),
                                                      ("zero3_offload", 3, "cpu")])
def test_deepspeed_configs_pass_deepspeeds_own_validation(stage_file, stage, offload, monkeypatch):
    """The configs as the 13B recipe uses them on 8 GPUs (bf16, micro-batch 1, 8 backward passes per update)."""
    import deepspeed.runtime.config as dsc

    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    mpu = SimpleNamespace(get_data_parallel_world_size=lambda: 8)
    cfg = dsc.DeepSpeedConfig(_filled(stage_file, world=8, micro=1, accumulation=8, bf16=True), mpu=mpu)
    assert cfg.world_size == 8
    assert cfg.train_batch_size == 1 * 8 * 8 and cfg.gradient_accumulation_steps == 8
    assert cfg.zero_optimization_stage == stage and cfg.bfloat16_config.enabled and not cfg.float16_config.enabled
    assert cfg.gradient_clipping == 1.0 and cfg.zero_allow_untested_optimizer
    zero = cfg.zero_config
    assert (zero.offload_param.device if zero.offload_param else None) in (offload, "none", None)
    if offload:
        assert zero.offload_param.device == offload and zero.offload_optimizer.device == offload
        assert cfg.zero_force_ds_cpu_optimizer is False  # the trainer's torch AdamW is allowed with offload
    else:
        assert zero.offload_param is None or zero.offload_param.device == "none"


def test_deepspeed_auto_keys_must_agree_with_the_recipe():
    from viva_base.distributed import configure_deepspeed as _configure_deepspeed
    from viva_base.errors import UserError

    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto"}
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu=4 but this recipe needs 2"):
        _configure_deepspeed(_fake_accelerator(ds), micro_batch=2, accumulation=3, clip=1.0)


def test_deepspeed_precision_must_agree_with_the_recipe():
    """accelerate fills bf16/fp16 "auto" from train.mixed_precision but lets a fixed value win silently."""
    from viva_base.distributed import configure_deepspeed
    from viva_base.errors import UserError

    def fill(bf16, mixed_precision):
        ds = {"bf16": {"enabled": bf16}}
        configure_deepspeed(_fake_accelerator(ds), micro_batch=1, accumulation=2, clip=1.0,
                            mixed_precision=mixed_precision)
        return ds

    assert fill("auto", "no")["train_batch_size"] == 4 and fill(True, "bf16")["gradient_clipping"] == 1.0
    fill(False, "no")
    with pytest.raises(UserError, match="sets bf16.enabled=true but the recipe has train.mixed_precision=no"):
        fill(True, "no")
    with pytest.raises(UserError, match="sets bf16.enabled=false but the recipe has train.mixed_precision=bf16"):
        fill("false", "bf16")


def test_sft_viva_fills_the_zero3_config_that_deepspeed_accepts(monkeypatch):
    """recipes/sft_viva.yaml on 8 GPUs: micro-batch 1 x 16 accumulation x 8 = the recipe's global batch 128, as
    viva_base.sft fills ds_zero3.json; DeepSpeed's own config class accepts it (bf16, ZeRO-3, clipping 1.0)."""
    import deepspeed.runtime.config as dsc

    from viva_base.recipe import load_recipe
    from viva_base.sft import SFTConfig, micro_batch_size

    cfg = load_recipe(SFTConfig, [f"recipe={REPO / 'recipes' / 'sft_viva.yaml'}"])
    tc = cfg.train
    assert tc.trainable == "full" and cfg.model.gradient_checkpointing and tc.mixed_precision == "bf16"
    micro = micro_batch_size(tc.batch_size, tc.gradient_accumulation_steps, 8)
    assert micro == 1
    ds = _filled("zero3", world=8, micro=micro, accumulation=tc.gradient_accumulation_steps, bf16=True)
    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    ds_cfg = dsc.DeepSpeedConfig(ds, mpu=SimpleNamespace(get_data_parallel_world_size=lambda: 8))
    assert ds_cfg.train_batch_size == tc.batch_size == 128 and ds_cfg.gradient_accumulation_steps == 16
    assert ds_cfg.zero_optimization_stage == 3 and ds_cfg.bfloat16_config.enabled


def test_micro_batch_size_is_the_global_batch_split_exactly():
    from viva_base.errors import UserError
    from viva_base.sft import micro_batch_size

    assert micro_batch_size(128, 16, 8) == 1 and micro_batch_size(8, 2, 2) == 2
    for bad in ((128, 16, 16), (12, 2, 4)):  # 0.5 and 1.5 pairs per process and micro-batch
        with pytest.raises(UserError, match="must be a multiple of gradient_accumulation_steps"):
            micro_batch_size(*bad)


def test_zero3_refuses_micro_batches_that_could_mix_reference_images():
    from viva_base.errors import UserError
    from viva_base.sft import check_zero3_forwards

    mixed = [{"reference": "r.png"}, {"reference": None}, {}]
    check_zero3_forwards(mixed, per_micro=1)  # one pair per process: one forward each
    check_zero3_forwards([{"reference": "a.png"}, {"reference": "b.png"}], per_micro=4)
    check_zero3_forwards([{}, {}], per_micro=4)
    with pytest.raises(UserError, match="1 of the 3 pairs have a reference image"):
        check_zero3_forwards(mixed, per_micro=2)


def _checkpoint(tmp_path: Path, name: str, deepspeed: dict | None) -> Path:
    ckpt = tmp_path / name
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, **({"deepspeed": deepspeed} if deepspeed else {})}))
    if deepspeed:
        (ckpt / "deepspeed").mkdir()
    return ckpt


def test_resume_refuses_a_checkpoint_of_another_layout(tmp_path):
    """A checkpoint resumes only under the layout that wrote it: DeepSpeed or not, ZeRO stage, processes."""
    from viva_base.distributed import check_resume
    from viva_base.errors import UserError

    ddp = _checkpoint(tmp_path, "ddp", None)
    z3 = _checkpoint(tmp_path, "z3", {"stage": 3, "world": 2})
    check_resume(ddp, _fake_accelerator(None))
    check_resume(z3, _fake_accelerator({}, world=2, stage=3))
    with pytest.raises(UserError, match="ddp has no deepspeed/ optimizer state"):
        check_resume(ddp, _fake_accelerator({}, world=2, stage=3))
    with pytest.raises(UserError, match="was written under DeepSpeed"):
        check_resume(z3, _fake_accelerator(None))
    with pytest.raises(UserError, match="written with ZeRO-3 on 2 processes; this run is ZeRO-2 on 2"):
        check_resume(z3, _fake_accelerator({}, world=2, stage=2))
    with pytest.raises(UserError, match="written with ZeRO-3 on 2 processes; this run is ZeRO-3 on 4"):
        check_resume(z3, _fake_accelerator({}, world=4, stage=3))


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload", "multi_gpu"])
def test_accelerate_configs_load_with_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACC / f"{name}.yaml"))
    if name == "multi_gpu":
        assert str(cfg.distributed_type).endswith("MULTI_GPU")
        return
    assert str(cfg.distributed_type).endswith("DEEPSPEED")
    ds_file = REPO / cfg.deepspeed_config["deepspeed_config_file"]
    assert ds_file.is_file() and ds_file.name == f"ds_{name}.json"


def test_backward_passes_per_update_match_the_update_loop():
    """DeepSpeed's gradient accumulation = micro-batches x trained steps, what the trainer's loop runs."""
    from editgrpo.config import GRPOConfig
    from editgrpo.distributed import backward_passes
    from editgrpo.train import choose_steps
    from editgrpo.sampling import sigma_schedule
    from viva_base.errors import UserError
    from viva_base.recipe import load_recipe

    cfg = load_recipe(GRPOConfig, [f"recipe={REPO / 'recipes' / 'toy.yaml'}"])
    n_local, train_bs = 32 // 2, 4  # 2 processes, micro-batches of 4
    mb = math.ceil(n_local / cfg.train.minibatches_per_iteration)
    n_steps = len(choose_steps(cfg, sigma_schedule(cfg.sampling.num_steps), 0)[1])
    for it in range(3):  # the trained-step count the trainer passes does not depend on the iteration or shift
        steps = choose_steps(cfg, sigma_schedule(cfg.sampling.num_steps, 7.0), it)[1]
        assert len(steps) == n_steps
        assert backward_passes(cfg, n_local, train_bs, n_steps) == math.ceil(mb / train_bs) * len(steps)
    assert backward_passes(cfg, 10, 4, n_steps) == 2 * n_steps  # minibatches of 5 and 5: 2 micro-batches each
    with pytest.raises(UserError, match="same number of micro-batches"):
        backward_passes(cfg, 9, 4, n_steps)  # minibatches of 5 and 4: 2 and 1 micro-batches


# ---------------------------------------------------------------------------- the scaling plan's counting
def test_real_configs_match_the_library_defaults():
    """The 13B DiT and VAE configs in the plan are the diffusers defaults (= the hub configs), widened to 2C."""
    import inspect

    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    from benchmarks.scaling import HUNYUAN_DIT_13B, HUNYUAN_VAE

    dit = {k: v.default for k, v in inspect.signature(HunyuanVideoTransformer3DModel.__init__).parameters.items()}
    for k, v in HUNYUAN_DIT_13B.items():
        assert (2 * dit["in_channels"] if k == "in_channels" else dit[k]) == v, k
    vae = {k: v.default for k, v in inspect.signature(AutoencoderKLHunyuanVideo.__init__).parameters.items()}
    assert all(vae[k] == v for k, v in HUNYUAN_VAE.items())


def test_token_counts_and_time_formula():
    from benchmarks.scaling import latent_grid, seconds_at_mfu, video_tokens

    assert latent_grid(33, 480, 848) == (9, 60, 106)
    assert video_tokens(33, 480, 848) == 9 * 30 * 53
    assert video_tokens(129, 720, 1280) == 33 * 45 * 80
    with pytest.raises(ValueError, match="4k\\+1"):
        latent_grid(32, 480, 848)
    assert seconds_at_mfu(8 * 0.4 * 989.4e12 * 10, 8) == pytest.approx(10.0)


def test_sft_memory_per_layout():
    """Full fine-tuning's training state: 16 B per parameter, partitioned by the ZeRO stage (hand arithmetic)."""
    from benchmarks.scaling import ZERO3_LIVE_PARAMS, sft_memory

    p, n, frozen, act = 8_000_000_000, 8, 1e9, 3e9
    ddp = sft_memory(p, frozen, act, n, 0)  # fp32 weights, fp32 gradients, Adam's moments, all replicated
    assert (ddp["weights"], ddp["grads"], ddp["optim"]) == (32e9, 32e9, 64e9)
    assert ddp["total"] == 16 * p + frozen + act == 132e9 and not ddp["fits"]
    z2 = sft_memory(p, frozen, act, n, 2)
    assert (z2["weights"], z2["grads"], z2["optim"]) == (16e9, 2e9, 12e9) and z2["total"] == 34e9
    z3 = sft_memory(p, frozen, act, n, 3)
    assert z3["live_params"] == 2 * ZERO3_LIVE_PARAMS == 2e9
    assert z3["total"] == 16 * p / n + 2e9 + frozen + act == 22e9 and z3["fits"]
    off = sft_memory(p, frozen, act, n, 3, offload=True)
    assert off["total"] == 2e9 + frozen + act
    # fits: at most 90% of 80 GB = 72 GB, here 18 GB of state + activations
    assert sft_memory(p, 0, 53e9, n, 3)["fits"] and not sft_memory(p, 0, 55e9, n, 3)["fits"]
    with pytest.raises(ValueError, match="offload"):
        sft_memory(p, frozen, act, n, 2, offload=True)


def test_docs_sft_table_matches_independent_arithmetic(repo_root):
    """docs/scaling.md's SFT cell for the recipe (480x848 x 33, ZeRO-3 + checkpointing, 8 GPUs) re-derived here:
    16 B x DiT parameters / 8 + 2 GB gathered + bf16 frozen instructor, VAE, text encoder + the counted
    checkpointed activations of one sample."""
    from diffusers import AutoencoderKLHunyuanVideo

    from benchmarks.scaling import (CLIP_L_TEXT_PARAMS, HUNYUAN_DIT_13B, HUNYUAN_VAE, TEXT_TOKENS, dit_pass,
                                    latent_grid, meta_editor_dit, vlm_cost)

    dit = meta_editor_dit(HUNYUAN_DIT_13B, lora_rank=None)
    n_dit = sum(p.numel() for p in dit.parameters())
    assert 12.5e9 < n_dit < 13.5e9
    with torch.device("meta"):
        n_vae = sum(p.numel() for p in AutoencoderKLHunyuanVideo(**HUNYUAN_VAE).parameters())
    act = dit_pass(dit, HUNYUAN_DIT_13B, 1, latent_grid(33, 480, 848), TEXT_TOKENS, train=True)["activations"]
    total = 16 * n_dit / 8 + 2 * 1e9 + 2 * (vlm_cost(1)["params"] + n_vae + CLIP_L_TEXT_PARAMS) + act["checkpointing"]
    assert 40e9 < total < 0.9 * 80e9  # it fits, as the document says
    text = (Path(repo_root) / "docs" / "scaling.md").read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| 480x848 x 33 (recipe) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # columns: setting, then (no ckpt, ckpt) for DDP, ZeRO-2, ZeRO-3, ZeRO-3 + offload
    assert cells[6] == f"{total / 1e9:.1f} GB fits", cells
    assert cells[4].endswith("**no**") and cells[2].endswith("**no**")  # ZeRO-2 and DDP with checkpointing do not
    assert "accelerate launch --config_file recipes/accelerate/zero3.yaml -m viva_base.sft" in text


def test_adam_state_bytes_per_zero_stage():
    from benchmarks.scaling import adam_state_bytes

    p, n = 1000, 8
    assert adam_state_bytes(p, n, 0) == 16 * p
    assert adam_state_bytes(p, n, 2) == 2 * p + (2 + 12) * p / n
    assert adam_state_bytes(p, n, 3) == 16 * p / n


TINY = dict(in_channels=24, out_channels=12, num_attention_heads=2, attention_head_dim=32, num_layers=1,
            num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
            text_embed_dim=64, pooled_projection_dim=32, rope_axes_dim=(8, 12, 12))


def test_flops_on_meta_equal_a_real_cpu_forward_plus_attention():
    """Meta-device counting = the real model's matmuls (counted on CPU, where fused SDPA is invisible to the
    counter) + exactly 4 B N^2 d per block of attention (N = video + text tokens)."""
    from diffusers import HunyuanVideoTransformer3DModel

    from benchmarks.scaling import count_flops, dit_inputs

    b, grid, text = 2, (5, 16, 16), 20
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = HunyuanVideoTransformer3DModel(**TINY)
    real = HunyuanVideoTransformer3DModel(**TINY)
    with torch.no_grad():
        on_meta = count_flops(lambda: meta(**dit_inputs(TINY, b, grid, text, torch.float32, "meta")))
        on_cpu = count_flops(lambda: real(**dit_inputs(TINY, b, grid, text, torch.float32, "cpu")))
    n = grid[0] * (grid[1] // 2) * (grid[2] // 2) + text
    d = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    blocks = TINY["num_layers"] + TINY["num_single_layers"]
    refiner = TINY["num_refiner_layers"] * 4 * b * text ** 2 * d  # the token refiner attends over the text only
    assert on_meta["attention"] == blocks * 4 * b * n ** 2 * d + refiner
    assert on_meta["total"] - on_meta["attention"] == on_cpu["total"]


def test_saved_activations_are_the_same_on_meta_and_cpu_and_affine_in_batch():
    from diffusers import HunyuanVideoTransformer3DModel

    from benchmarks.scaling import dit_pass, meta_like
    from viva_base.peft_utils import add_lora

    torch.manual_seed(0)
    real = HunyuanVideoTransformer3DModel(**TINY)
    add_lora(real, rank=4, alpha=8, targets=r".*transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)")
    meta = meta_like(real)
    grid = (3, 8, 8)
    a_cpu = dit_pass(real, TINY, 2, grid, 10, train=True)["activations"]
    a_meta = dit_pass(meta, TINY, 2, grid, 10, train=True)["activations"]
    a_meta1 = dit_pass(meta, TINY, 1, grid, 10, train=True)["activations"]
    a_meta4 = dit_pass(meta, TINY, 4, grid, 10, train=True)["activations"]
    assert a_cpu["no_checkpointing"] > 0
    for k in ("no_checkpointing", "checkpointing", "per_block_max"):
        assert a_meta[k] == a_cpu[k], k
        # affine in the batch (RoPE tables are shared by the batch)
        assert a_meta4[k] - a_meta[k] == 2 * (a_meta[k] - a_meta1[k]) > 0, k
    assert a_meta["checkpointing"] < a_meta["no_checkpointing"]


def test_13b_editor_dit_on_meta_has_13b_parameters_and_the_paper_lora():
    from benchmarks.scaling import HUNYUAN_DIT_13B, meta_editor_dit

    dit = meta_editor_dit(HUNYUAN_DIT_13B, lora_rank=64, lora_alpha=128)
    frozen = sum(p.numel() for p in dit.parameters() if not p.requires_grad)
    lora = [(n, p) for n, p in dit.named_parameters() if p.requires_grad]
    assert 12.5e9 < frozen < 13.5e9
    d = 3072
    # dual-stream blocks: 8 projections (to_q/k/v/out, add_q/k/v, to_add_out); single-stream: to_q/k/v
    assert sum(p.numel() for _, p in lora) == 64 * 2 * d * (20 * 8 + 40 * 3)
    assert all("lora_" in n for n, _ in lora)


def test_zero3_grpo_refuses_prompts_that_would_mix_reference_forwards():
    """Under ZeRO-3 a rollout or training batch mixing prompts with and without a reference image would run two DiT
    forwards on one process and one on another, and the processes would wait on each other for ever."""
    from editgrpo.distributed import check_reference_forwards
    from viva_base.errors import UserError

    mixed = [{"reference": "a.png"}, {}]
    check_reference_forwards(mixed, rollout_bs=1, train_bs=1)  # one sample a forward: never mixed
    check_reference_forwards([{"reference": "a.png"}, {"reference": "b.png"}], rollout_bs=4, train_bs=4)
    check_reference_forwards([{}, {}], rollout_bs=4, train_bs=2)
    for bs in ((2, 1), (1, 2)):
        with pytest.raises(UserError, match="1 of the 2 prompts have a reference image: set "
                                            "sampling.rollout_batch_size=1 and train.train_batch_size=1"):
            check_reference_forwards(mixed, *bs)


def test_the_page_command_reads_every_input_before_writing_anything(tmp_path, capsys):
    """``python -m benchmarks.scaling`` wrote outputs/scaling.json, then died with a FileNotFoundError traceback on a
    missing --gpu-check (after its 80 s plan). Now each unreadable input is one line, exit 2, before the plan, and
    nothing is written."""
    from benchmarks.scaling import main

    out, js = tmp_path / "page.md", tmp_path / "plan.json"
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("not json")
    for args, words in ((["--gpu-check", str(tmp_path / "nope.json")], "--gpu-check"),
                        (["--perf", str(bad_json)], f"--perf {bad_json}: Expecting value"),
                        (["--recipe", "recipes/nope.yaml"], "recipe file 'recipes/nope.yaml' not found"),
                        (["--sft-recipe", "recipes/tiny.yaml"], "unknown recipe key")):
        assert main([*args, "--out", str(out), "--json", str(js)]) == 2
        assert words in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "no_docs" / "scaling.md"), "--json", str(js)]) == 2
    assert "no folder" in capsys.readouterr().err
    for args, words in ((["--out", "/proc/page.md", "--json", str(js)], "--out /proc/page.md: cannot create folders"),
                        (["--out", str(out), "--json", "/proc/no/plan.json"], "--json /proc/no/plan.json: cannot")):
        assert main(args) == 2  # tracebacks after the plan before
        assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]
