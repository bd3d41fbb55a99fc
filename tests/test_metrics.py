"""benchmarks.metrics: the metric formulas against independent computations, and the model features
against the reference implementations' way of computing them (transformers models + their processors)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.metrics import (
    MetricConfig,
    VideoMetrics,
    frame_text_alignment,
    load_dino,
    make_tiny_dino,
    model_fingerprint,
    pickscore_video,
    temporal_consistency,
    uniform_frame_indices,
    video_text_alignment,
)


# ------------------------------------------------------------------------------------------------ formulas
def _cos(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _tc_reference(feats, mode):
    """Loop form of the EditVerse / VBench formulas, in float64."""
    total = 0.0
    for i in range(1, len(feats)):
        prev = max(0.0, _cos(feats[i], feats[i - 1]))
        if mode == "editverse":
            total += prev
        else:
            total += (prev + max(0.0, _cos(feats[i], feats[0]))) / 2
    return total / (len(feats) - 1)


@pytest.mark.parametrize("mode", ["editverse", "vbench"])
def test_temporal_consistency_identities(mode):
    f = torch.randn(1, 16).repeat(7, 1) * torch.arange(1, 8).float()[:, None]  # same direction, any scale
    assert float(temporal_consistency(f, mode)) == pytest.approx(1.0, abs=1e-6)
    v = torch.randn(16)
    alternating = torch.stack([v, -v])  # a frame and its negative: cos = -1 -> max(0, .) = 0
    assert float(temporal_consistency(alternating, mode)) == 0.0
    assert math.isnan(float(temporal_consistency(torch.randn(1, 16), mode)))


@pytest.mark.parametrize("mode", ["editverse", "vbench"])
def test_temporal_consistency_matches_loop_reference(mode):
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(3, 9, 5, generator=g) + 0.3  # mixed-sign cosines, so the clamp matters
    got = temporal_consistency(batch, mode)
    assert got.shape == (3,)
    for b in range(3):
        assert float(got[b]) == pytest.approx(_tc_reference(batch[b].tolist(), mode), abs=1e-6)
    # the two modes differ when the video drifts away from its first frame
    drift = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])])
    assert float(temporal_consistency(drift, "editverse")) == pytest.approx(math.sqrt(0.5))
    assert float(temporal_consistency(drift, "vbench")) == pytest.approx((math.sqrt(0.5) + (math.sqrt(0.5) + 0) / 2) / 2)
    with pytest.raises(ValueError, match="editverse"):
        temporal_consistency(batch, "other")


def test_text_alignment_formulas():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(8, generator=g)
    expected = 100.0 * sum(_cos(img[i], txt) for i in range(6)) / 6
    assert float(frame_text_alignment(img, txt, 100.0)) == pytest.approx(expected, rel=1e-5)
    assert float(pickscore_video(img, txt, 21.5)) == pytest.approx(expected * 0.215, rel=1e-5)
    batched = frame_text_alignment(img[None].repeat(2, 1, 1), txt[None].repeat(2, 1), 100.0)
    assert batched.shape == (2,) and torch.allclose(batched, torch.full((2,), expected), rtol=1e-5)
    v = torch.randn(8, generator=g)
    assert float(video_text_alignment(v, txt)) == pytest.approx(100 * _cos(v, txt), rel=1e-5)
    assert float(video_text_alignment(v, v)) == pytest.approx(100.0)


def test_uniform_frame_indices():
    assert uniform_frame_indices(20, 8) == [0, 2, 5, 7, 10, 12, 15, 17]
    assert uniform_frame_indices(5, 8) == [0, 0, 1, 1, 2, 3, 3, 4]
    assert uniform_frame_indices(8, 8) == list(range(8))


# ------------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from rewards.tiny import make_tiny_hf_clip

    root = tmp_path_factory.mktemp("metric_models")
    return {"clip": make_tiny_hf_clip(root / "clip"), "dino": make_tiny_dino(root / "dino")}


def _frames(n=5, h=32, w=32, seed=0):
    """Frames on the 8-bit grid (what a decoded video holds) and as uint8 HWC arrays for processors."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)
    return u8.permute(0, 3, 1, 2).float() / 255.0, [a.numpy() for a in u8]


def test_clip_tc_equals_editverse_reference(tiny_models):
    """EditVerse: CLIPVisionModel pooler_output of each processed frame, max(0, cos) with the previous one."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    frames, arrays = _frames()
    frames[3] = frames[2]  # one identical consecutive pair
    arrays[3] = arrays[2]
    vision = CLIPVisionModel.from_pretrained(tiny_models["clip"]).eval()
    proc = CLIPImageProcessor.from_pretrained(tiny_models["clip"])
    with torch.no_grad():
        feats = [vision(pixel_values=proc(images=a, return_tensors="pt").pixel_values).pooler_output[0] for a in arrays]
    expected = _tc_reference([f.tolist() for f in feats], "editverse")
    metrics = VideoMetrics(MetricConfig(metrics=("clip_tc",), clip="hf:" + tiny_models["clip"]))
    got = metrics.compute(frames, None)
    assert set(got) == {"clip_tc"}
    assert got["clip_tc"] == pytest.approx(expected, abs=1e-5)
    vb = VideoMetrics(MetricConfig(metrics=("clip_tc",), clip="hf:" + tiny_models["clip"], tc_mode="vbench"))
    assert vb.compute(frames, None)["clip_tc"] == pytest.approx(_tc_reference([f.tolist() for f in feats], "vbench"),
                                                               abs=1e-5)


def test_dino_tc_equals_reference(tiny_models):
    """EditVerse: Dinov2Model pooler_output (CLS after the layer norm) with its BitImageProcessor."""
    from transformers import AutoImageProcessor, Dinov2Model

    frames, arrays = _frames(seed=1)
    model = Dinov2Model.from_pretrained(tiny_models["dino"]).eval()
    proc = AutoImageProcessor.from_pretrained(tiny_models["dino"])
    with torch.no_grad():
        feats = [model(pixel_values=proc(images=a, return_tensors="pt").pixel_values).pooler_output[0] for a in arrays]
    got = VideoMetrics(MetricConfig(metrics=("dino_tc",), dino=tiny_models["dino"])).compute(frames, None)
    assert got["dino_tc"] == pytest.approx(_tc_reference([f.tolist() for f in feats], "editverse"), abs=1e-5)
    enc = load_dino(tiny_models["dino"])
    assert enc is load_dino(tiny_models["dino"])  # loaded once per process
    assert torch.allclose(enc.encode(frames), torch.stack(feats), atol=1e-5)


def test_clip_t_and_pickscore_equal_reference(tiny_models):
    """EditVerse CLIP-T / PickScore: logit_scale.exp() * cos(frame, caption) averaged over frames."""
    from transformers import CLIPModel, CLIPProcessor

    frames, arrays = _frames(n=3, seed=2)
    caption = "a red cat sitting on a blue sofa"
    model = CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    proc = CLIPProcessor.from_pretrained(tiny_models["clip"])
    with torch.no_grad():
        logits = [model(**proc(text=[caption], images=a, return_tensors="pt", padding=True)).logits_per_image.item()
                  for a in arrays]
    expected = sum(logits) / len(logits)
    cfg = MetricConfig(metrics=("clip_t", "pickscore"), clip="hf:" + tiny_models["clip"],
                       pickscore="hf:" + tiny_models["clip"])
    metrics = VideoMetrics(cfg)
    assert metrics.pickscore_processor is None  # a local PickScore brings its own processor
    got = metrics.compute(frames, caption)
    assert got["clip_t"] == pytest.approx(expected, abs=1e-4)
    assert got["pickscore"] == pytest.approx(expected, abs=1e-4)
    # text metrics need the target caption: without one they are None, not a made-up number
    assert metrics.compute(frames, "") == {"clip_t": None, "pickscore": None}
    # PickScore first scales frames larger than pickscore_max_side down (EditVerse: 672)
    big = torch.nn.functional.interpolate(frames, size=(64, 64), mode="nearest")
    small = torch.nn.functional.interpolate(big, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    capped = VideoMetrics(MetricConfig(metrics=("pickscore",), pickscore="hf:" + tiny_models["clip"],
                                       pickscore_max_side=32))
    assert capped.compute(big, caption)["pickscore"] == pytest.approx(
        VideoMetrics(MetricConfig(metrics=("pickscore",), pickscore="hf:" + tiny_models["clip"],
                                  pickscore_max_side=None)).compute(small, caption)["pickscore"], abs=1e-5)


# ------------------------------------------------------------------------------------------------ ViCLIP
class _TinyViclip:
    """Stands in for the official ViCLIP model through the plugin interface: the 'video embedding' is the
    per-channel mean of the frames it receives, the 'text embedding' a fixed function of the text."""

    def __init__(self):
        self.seen = None

    def eval(self):
        return self

    def encode_vision(self, video, test=False):
        assert test is True  # the official code's flag is passed when accepted
        self.seen = video
        return video.mean(dim=(1, 3, 4))

    def encode_text(self, text):
        return torch.tensor([[len(text) % 7 + 1.0, 2.0, -1.0]])


def make_tiny_viclip(weights, device):
    return _TinyViclip()


def test_viclip_plugin_and_not_computed(tmp_path):
    from rewards.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    off = VideoMetrics(MetricConfig(metrics=("viclip_t",)))
    assert "viclip_t" in off.not_computed and off.active == ()
    assert off.compute(torch.rand(3, 3, 8, 8), "a cat") == {}

    weights = tmp_path / "viclip.pth"
    weights.write_bytes(b"weights")
    frames = torch.stack([torch.full((3, 16, 16), i / 20) for i in range(20)])  # frame i has value i/20
    on = VideoMetrics(MetricConfig(metrics=("viclip_t",), viclip=f"{__name__}:make_tiny_viclip",
                                   viclip_weights=str(weights)))
    text = "a dog on the grass"
    got = on.compute(frames, text)["viclip_t"]
    model = on.viclip().model
    assert tuple(model.seen.shape) == (1, 8, 3, 224, 224)
    idx = uniform_frame_indices(20, 8)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    expected_video = torch.stack([((torch.tensor(i / 20) - mean) / std) for i in idx]).mean(0)
    assert torch.allclose(model.seen[0].mean(dim=(2, 3)), torch.stack([(i / 20 - mean) / std for i in idx]), atol=1e-5)
    assert got == pytest.approx(100 * _cos(expected_video, model.encode_text(text)[0]), abs=1e-3)
    assert on.protocol()["models"]["viclip"]["code"].endswith("make_tiny_viclip")
    with pytest.raises(FileNotFoundError, match="viclip-weights"):
        VideoMetrics(MetricConfig(metrics=("viclip_t",), viclip=f"{__name__}:make_tiny_viclip",
                                  viclip_weights=str(tmp_path / "missing.pth"))).compute(frames, text)


def test_config_validation_and_fingerprint(tmp_path, tiny_models):
    with pytest.raises(ValueError, match="available"):
        MetricConfig(metrics=("clip_tc", "fvd"))
    with pytest.raises(ValueError, match="tc_mode"):
        MetricConfig(tc_mode="mean")
    a = tmp_path / "a"
    a.mkdir()
    (a / "model.safetensors").write_bytes(b"1" * 100)
    fp1 = model_fingerprint(str(a))["weights_fingerprint"]
    (a / "model.safetensors").write_bytes(b"2" * 100)
    assert model_fingerprint(str(a))["weights_fingerprint"] != fp1
    assert "weights_fingerprint" not in model_fingerprint("hf:some/hub-id")
    proto = VideoMetrics(MetricConfig(metrics=("clip_tc", "dino_tc"), clip="hf:" + tiny_models["clip"],
                                      dino=tiny_models["dino"])).protocol()
    assert set(proto["models"]) == {"clip", "dino"} and proto["tc_mode"] == "editverse"
    assert proto["models"]["clip"]["weights_fingerprint"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda_match_cpu(tiny_models):
    frames, _ = _frames(seed=3)
    cfg = dict(metrics=("clip_tc", "dino_tc", "clip_t"), clip="hf:" + tiny_models["clip"], dino=tiny_models["dino"])
    cpu = VideoMetrics(MetricConfig(**cfg)).compute(frames, "a cat")
    gpu = VideoMetrics(MetricConfig(**cfg, device="cuda")).compute(frames, "a cat")
    assert gpu.keys() == cpu.keys()
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], abs=1e-3)
