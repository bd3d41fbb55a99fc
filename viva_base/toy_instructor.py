"""The toy world's pretrained "VLM": the tiny LLaVA instructor (and the tiny CLIP text encoder) taught to read
toy instructions, then frozen, as VIVA freezes its pretrained LLaVA.

Why (docs/toy_world.md, "two more causes"): a randomly initialised, frozen 3-layer LLaVA gives the DiT features in
which a recolour and a removal of the same object are hard to tell apart (recolour + remove SFT: recolour
``if_progress`` 0.04 with them, 0.49 with a clean symbolic encoding of the edit). A real instructor arrives
pretrained on image-text data and reads an instruction's meaning; this stage gives the toy one that ability on toy
data: a linear probe on the LLaVA's state at the instruction's last token (the layer the DiT reads) and one on
CLIP's pooled vector must predict the instruction's parse (:func:`viva_base.data.toyworld.edits.edit_parse`: the
operation types, the object acted on, the new colour or shape, place, motion, background), multi-hot, with a
binary cross-entropy. The instructor sees the source's first frame, as in editing. Only the instructor and the
text encoder train; the DiT of the saved editor is the tiny random one the SFT stage then trains.

The stage is cached in its folder by a fingerprint of its settings and training instructions (``stage.json``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

STAGE = "stage.json"
DEFAULTS = {"steps": 1500, "batch_size": 32, "lr": 1e-3}


def _records(manifests) -> list[dict]:
    """The manifests' records that carry an instruction with its ``ops`` and source ``scene``."""
    from viva_base.data.manifest import read_jsonl

    return [r for path in manifests for _, r in read_jsonl(path)
            if r.get("ops") and r.get("scene") and r.get("instruction")]


def parse_targets(records: list[dict]) -> torch.Tensor:
    """``(N, P)`` multi-hot parses of the records' instructions (their ``ops`` on their source ``scene``)."""
    from viva_base.data.toyworld.edits import edit_parse, op_from_json
    from viva_base.data.toyworld.scene import scene_from_json

    return torch.stack([edit_parse([op_from_json(o) for o in r["ops"]], scene_from_json(r["scene"])) for r in records])


def exact_parse_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of instructions whose every parse value is predicted right (logit > 0 iff set)."""
    return float(((logits > 0) == (targets > 0.5)).all(dim=1).float().mean())


class ParseProbes(torch.nn.Module):
    """Linear probes from the instructor's last-token state and from CLIP's pooled vector to the parse logits."""

    def __init__(self, llava_dim: int, clip_dim: int, n: int):
        super().__init__()
        self.llava, self.clip = torch.nn.Linear(llava_dim, n), torch.nn.Linear(clip_dim, n)


def _encode(editor, texts: list[str], frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """With gradients: the instructor's state at each instruction's last token (the layer the DiT reads) and
    CLIP's pooled vector."""
    from viva_base.instructor import encode_instructions

    hidden, mask = encode_instructions.__wrapped__(editor.instructor, editor.processor, texts,
                                                   [[f] for f in frames], editor.config.instructor)
    last = hidden[torch.arange(len(texts)), mask.sum(1) - 1]
    tok = editor.tokenizer_2(texts, padding="max_length", max_length=editor.config.pooled_max_length,
                             truncation=True, return_tensors="pt")
    pooled = editor.text_encoder_2(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
    return last, pooled


def fingerprint(settings: dict, manifests) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in manifests:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def pretrain_toy_instructor(out: str | Path, manifests, tiny_spec: dict, *, tiny_seed: int = 0, seed: int = 0,
                            heldout: str | Path | None = None, progress: bool = True, **overrides) -> tuple[Path, str]:
    """Train (or reuse) the toy instructor; returns ``(editor folder, stage fingerprint)``. ``manifests``: the
    training instructions (pairs or prompts manifests with ``ops`` and ``scene``); ``heldout``: instructions whose
    exact-parse accuracy is reported (never trained on). ``overrides``: ``steps``, ``batch_size``, ``lr``."""
    from tqdm.auto import tqdm

    from viva_base.data.toyworld.render import render_tensor
    from viva_base.data.toyworld.scene import scene_from_json
    from viva_base.recipe import atomic_write_text
    from viva_base.tiny import TinySpec, make_tiny_editor

    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"pretrain_toy_instructor: unknown settings {sorted(unknown)}")
    settings = {**DEFAULTS, **overrides, "tiny_spec": tiny_spec, "tiny_seed": tiny_seed, "seed": seed}
    out = Path(out)
    fp = fingerprint(settings, manifests)
    editor_dir = out / "editor"
    stage = out / STAGE
    if (editor_dir / "editor_config.json").exists() and stage.exists() and json.loads(stage.read_text()).get("fingerprint") == fp:
        logger.info("toy chain: reusing the pretrained toy instructor in %s", editor_dir)
        return editor_dir, fp

    t0 = time.time()
    editor = make_tiny_editor(TinySpec(**tiny_spec), seed=tiny_seed)
    records = _records(manifests)
    if not records:
        raise ValueError(f"no instructions with ops and scene in {list(map(str, manifests))}")
    targets = parse_targets(records)
    frames: dict[int, torch.Tensor] = {}

    def frame(i: int) -> torch.Tensor:
        if i not in frames:
            frames[i] = render_tensor(scene_from_json(records[i]["scene"]))[0]
        return frames[i]

    torch.manual_seed(seed)
    probes = ParseProbes(editor.instructor.config.text_config.hidden_size, editor.text_encoder_2.config.hidden_size,
                         targets.shape[1])
    trained = [*editor.instructor.parameters(), *editor.text_encoder_2.parameters()]
    for p in trained:
        p.requires_grad_(True)
    editor.instructor.train()
    editor.text_encoder_2.train()
    opt = torch.optim.AdamW([*trained, *probes.parameters()], lr=settings["lr"], weight_decay=0.0)
    rng = random.Random(seed)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    log = []
    bar = tqdm(range(settings["steps"]), desc="toy instructor", disable=not progress)
    for step in bar:
        idx = rng.sample(range(len(records)), min(settings["batch_size"], len(records)))
        y = targets[idx]
        last, pooled = _encode(editor, [records[i]["instruction"] for i in idx], [frame(i) for i in idx])
        logit_l, logit_c = probes.llava(last), probes.clip(pooled)
        loss = bce(logit_l, y) + bce(logit_c, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 0 or (step + 1) % 100 == 0 or step + 1 == settings["steps"]:
            row = {"step": step + 1, "loss": loss.item(), "train_parse_acc_llava": exact_parse_accuracy(logit_l, y),
                   "train_parse_acc_clip": exact_parse_accuracy(logit_c, y)}
            log.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
    for p in trained:
        p.requires_grad_(False)
    editor.instructor.eval()
    editor.text_encoder_2.eval()
    result = {"fingerprint": fp, "settings": settings, "train_instructions": len(records), "log": log,
              "seconds": round(time.time() - t0, 1)}
    if heldout is not None:
        result["heldout"] = heldout_accuracy(editor, probes, heldout)
    tmp = out / "editor.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    editor.save_pretrained(tmp)
    torch.save(probes.state_dict(), tmp / "parse_probes.pt")
    shutil.rmtree(editor_dir, ignore_errors=True)
    tmp.rename(editor_dir)
    atomic_write_text(stage, json.dumps(result, indent=1))
    logger.info("toy instructor: %d steps in %.0f s; held-out exact parse %s", settings["steps"], result["seconds"],
                result.get("heldout"))
    return editor_dir, fp


@torch.no_grad()
def heldout_accuracy(editor, probes: ParseProbes, manifest, batch: int = 64) -> dict:
    """Exact-parse accuracy of both probes on a manifest's instructions, per split when it has one."""
    from viva_base.data.toyworld.render import render_tensor
    from viva_base.data.toyworld.scene import scene_from_json

    records = _records([manifest])
    targets = parse_targets(records)
    hits_l, hits_c = [], []
    for s in range(0, len(records), batch):
        rs = records[s:s + batch]
        last, pooled = _encode(editor, [r["instruction"] for r in rs],
                               [render_tensor(scene_from_json(r["scene"]))[0] for r in rs])
        y = targets[s:s + batch]
        hits_l.append(((probes.llava(last) > 0) == (y > 0.5)).all(1))
        hits_c.append(((probes.clip(pooled) > 0) == (y > 0.5)).all(1))
    hl, hc = torch.cat(hits_l), torch.cat(hits_c)
    out = {"all": {"n": len(records), "llava": float(hl.float().mean()), "clip": float(hc.float().mean())}}
    for split in sorted({r.get("split") for r in records if r.get("split")}):
        sel = torch.tensor([r.get("split") == split for r in records])
        out[split] = {"n": int(sel.sum()), "llava": float(hl[sel].float().mean()), "clip": float(hc[sel].float().mean())}
    return out
