"""Trainable weights are float32 (master weights) whatever the model dtype: a bf16 editor's LoRA (Edit-GRPO) and its
SFT-trained parts take an AdamW update at lr 1e-5, which bf16 weights would round away; the frozen base stays bf16."""
import pytest
import torch

from viva_base.peft_utils import add_lora
from viva_base.sft import LoraConfig, TrainConfig, set_trainable, sft_loss
from viva_base.tiny import make_tiny_editor
from viva_base.training import compute_autocast

pytestmark = pytest.mark.usefixtures("one_thread")


def _bf16_editor():
    editor = make_tiny_editor(seed=3)
    editor.to(dtype=torch.bfloat16)
    return editor


def _changed_after_adamw_step(params, loss_fn):
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    loss_fn().backward()
    has_grad = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]
    opt.step()
    return [bool((p.detach() != b).any()) for p, b, g in zip(params, before, has_grad) if g]


def test_grpo_lora_on_a_bf16_editor_is_fp32_and_takes_small_updates():
    editor = _bf16_editor()
    add_lora(editor.transformer, rank=4, alpha=8, targets=editor.lora_targets)  # as editgrpo.train does
    params = [p for p in editor.transformer.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    frozen = [p for p in editor.transformer.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in editor.transformer.named_parameters():
            if "lora_B" in n:  # a trained-looking adapter, so lora_A gets a gradient too
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    cond, _ = editor.encode_condition(torch.rand(2, 5, 3, 16, 16, generator=g), ["a", "b"], with_uncond=False)
    z = torch.randn(2, *editor.latent_shape(cond), generator=g)
    changed = _changed_after_adamw_step(params, lambda: editor.velocity(z, torch.tensor([0.4, 0.8]), cond).pow(2).mean())
    assert len(changed) == len(params) and all(changed)


@pytest.mark.parametrize("trainable", ["projector_refiner", "lora"])
def test_sft_trainable_parts_of_a_bf16_editor_are_fp32_and_take_small_updates(trainable):
    editor = _bf16_editor()
    params = set_trainable(editor, TrainConfig(trainable=trainable), LoraConfig(rank=4, alpha=8))
    assert params and all(p.dtype == torch.float32 for p in params)
    assert any(p.dtype == torch.bfloat16 for p in editor.transformer.parameters() if not p.requires_grad)
    g = torch.Generator().manual_seed(0)
    batch = {"source": torch.rand(2, 5, 3, 16, 16, generator=g), "target": torch.rand(2, 5, 3, 16, 16, generator=g),
             "mask": (torch.rand(2, 5, 1, 16, 16, generator=g) > 0.7).float(), "instruction": ["a", "b"],
             "reference": [None, None]}

    def loss():
        with compute_autocast("cpu", torch.bfloat16):  # as viva_base.sft runs the forward
            return sft_loss(editor, batch, torch.Generator().manual_seed(1), w_m=1.0, cfg_dropout=0.0,
                            timestep_sampling="uniform", shift=1.0)

    changed = _changed_after_adamw_step(params, loss)
    assert len(changed) > 0 and all(changed)


def test_gaussian_lora_init_has_std_one_over_rank_as_documented():
    """peft's gaussian init draws A with standard deviation 1/r (not variance 1/r); add_lora's docstring says so."""
    import viva_base.peft_utils as pu

    editor = make_tiny_editor(seed=0)
    torch.manual_seed(0)
    add_lora(editor.transformer, rank=4, alpha=8, init="gaussian", targets=editor.lora_targets)
    a = torch.cat([p.detach().flatten() for n, p in editor.transformer.named_parameters() if "lora_A" in n])
    assert a.numel() > 1000 and abs(float(a.std()) - 1 / 4) < 0.02  # sqrt(1/r) would be 0.5
    doc = " ".join(pu.add_lora.__doc__.split())
    assert "standard deviation 1/r" in doc and "N(0, 1/r)" not in doc
