"""'tiny:hf' / 'tiny:open_clip': tiny random CLIPs cached on disk and loaded through the normal loaders."""
import pytest
import torch

from rewards.clip import clear_clip_cache, load_clip, parse_clip_spec


def test_tiny_specs_build_once_and_load_like_real_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITGRPO_CACHE", str(tmp_path))
    clear_clip_cache()
    spec = parse_clip_spec("tiny:hf")
    assert spec.backend == "hf" and (tmp_path / "tiny-clip" / "hf-0" / "config.json").exists()
    mtime = (tmp_path / "tiny-clip" / "hf-0" / "config.json").stat().st_mtime_ns
    assert parse_clip_spec("tiny:hf") == spec  # cached folder reused
    assert (tmp_path / "tiny-clip" / "hf-0" / "config.json").stat().st_mtime_ns == mtime
    a = load_clip("tiny:hf").encode_texts(["a red square"])
    clear_clip_cache()
    b = load_clip(spec.name).encode_texts(["a red square"])  # the same folder through the plain hf path
    assert torch.equal(a, b)
    oc = parse_clip_spec("tiny:open_clip:3")
    assert oc.backend == "open_clip" and oc.name.startswith("local-dir:")
    assert load_clip("tiny:open_clip:3").encode_images(torch.rand(2, 3, 32, 32)).shape[0] == 2
    with pytest.raises(ValueError, match="tiny CLIP"):
        parse_clip_spec("tiny:nope")
