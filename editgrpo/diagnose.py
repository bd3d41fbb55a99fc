"""Why does an editor (not) edit? Two measurements, for an editor directory and a pairs or eval manifest.

    python -m editgrpo.diagnose --model outputs/toy/sft/final --manifest outputs/toy/data/sft.jsonl
    python -m editgrpo.diagnose --model outputs/toy/sft/final --manifest outputs/toy/data/eval.jsonl \\
        --groups 8 --group-size 8 --rewards recipes/toy.yaml

1. **Clean-latent error per noise level** (records with a ``target`` and ``mask``): for each sigma, noise the
   target latent, predict the velocity (conditional, no CFG) and the clean latent ``x0 = z - sigma v``, and
   report the mean absolute error against the true target latent inside the edit region and outside it
   (latent units; the latent std is printed beside). Outside the region the target equals the source the
   editor is given, so an editor that copies its source channels has ~0 error there at every sigma; an
   error that grows with sigma means the model leans on the noisy latent instead of the source.
2. **Within-group spread** of ``G`` stochastic (SDE) samples of one prompt, the quantity GRPO ranks: the
   standard deviation over a group of the oracle score (toy records) and of each reward, averaged over
   groups. A spread near 0 gives GRPO nothing to rank.

Both print a table and, with ``--out``, write JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from viva_base.data.manifest import read_manifest
from viva_base.data.toyworld.oracle import best_oracle_scores, read_mask, record_truths
from viva_base.losses import add_noise, mask_to_latent
from viva_base.recipe import atomic_write_text
from viva_base.video import read_video

DEFAULT_SIGMAS = (0.95, 0.8, 0.5, 0.2, 0.05)


def _load(rec: dict) -> dict:
    item = {"source": read_video(rec["source"]).frames}
    if rec.get("target"):
        item["target"] = read_video(rec["target"]).frames
    if rec.get("mask"):
        item["mask"] = read_mask(rec["mask"])
    return item


@torch.no_grad()
def clean_latent_errors(editor, records: list[dict], sigmas=DEFAULT_SIGMAS, *, batch_size: int = 16,
                        seed: int = 0) -> dict:
    """Mean |x0_pred - x0| inside / outside the edit region per sigma (see the module docstring).

    ``x0_pred = z_sigma - sigma v(z_sigma, sigma, cond)`` with ``z_sigma = (1 - sigma) z_tgt + sigma noise``;
    also the same error of copying the source (``x0_pred = z_src``) inside the region, for scale."""
    recs = [r for r in records if r.get("target") and r.get("mask")]
    if not recs:
        raise ValueError("clean-latent errors need records with a target and a mask (a pairs or toy eval manifest)")
    g = torch.Generator().manual_seed(seed)
    sums = {s: {"inside": 0.0, "outside": 0.0, "n_in": 0.0, "n_out": 0.0} for s in sigmas}
    copy_in, n_in_total, lat_sq, lat_n = 0.0, 0.0, 0.0, 0
    device = editor.device
    loaded = [(r, _load(r)) for r in recs]
    by_shape: dict[tuple, list] = {}
    for r, it in loaded:  # video and image (1-frame) pairs batch separately
        by_shape.setdefault((tuple(it["source"].shape), tuple(it["target"].shape)), []).append((r, it))
    chunks = [grp[i:i + batch_size] for grp in by_shape.values() for i in range(0, len(grp), batch_size)]
    for chunk_items in chunks:
        chunk = [r for r, _ in chunk_items]
        items = [it for _, it in chunk_items]
        src = torch.stack([it["source"] for it in items]).to(device)
        cond, _ = editor.encode_condition(src, [r["instruction"] for r in chunk], [None] * len(chunk),
                                          with_uncond=False)
        z_tgt = editor.encode_video(torch.stack([it["target"] for it in items]).to(device)).float()
        z_src = cond["source_latents"].float()
        m = mask_to_latent(torch.stack([it["mask"] for it in items]).to(device), tuple(z_tgt.shape[2:]),
                           editor.temporal_ratio).expand_as(z_tgt)
        lat_sq += float((z_tgt - z_tgt.mean()).pow(2).sum())
        lat_n += z_tgt.numel()
        copy_in += float(((z_src - z_tgt).abs() * m).sum())
        n_in_total += float(m.sum())
        for s in sigmas:
            noise = torch.randn(z_tgt.shape, generator=g).to(device)
            sig = torch.full((len(chunk),), float(s), device=device)
            z = add_noise(z_tgt, noise, sig)
            x0 = z - s * editor.velocity(z, sig, cond)
            err = (x0 - z_tgt).abs()
            sums[s]["inside"] += float((err * m).sum())
            sums[s]["outside"] += float((err * (1 - m)).sum())
            sums[s]["n_in"] += float(m.sum())
            sums[s]["n_out"] += float((1 - m).sum())
    rows = [{"sigma": s, "inside": v["inside"] / max(v["n_in"], 1.0), "outside": v["outside"] / max(v["n_out"], 1.0)}
            for s, v in sums.items()]
    return {"n": len(recs), "latent_std": math.sqrt(lat_sq / max(lat_n, 1)),
            "copy_source_inside": copy_in / max(n_in_total, 1.0), "rows": rows}


@torch.no_grad()
def group_spread(editor, records: list[dict], *, groups: int = 8, group_size: int = 8, num_steps: int = 10,
                 guidance_scale: float = 2.0, method: str = "flow_sde", eta: float = 0.7, sde_window=None,
                 reward_fn=None, seed: int = 0) -> dict:
    """Within-group standard deviation of the oracle score and of each reward over ``group_size`` SDE samples
    of a prompt, averaged over ``groups`` prompts (the first ones of ``records``); with targets, also each score's
    within-group Spearman correlation with the oracle (``rank_vs_oracle``, averaged over the groups where both
    spread more than 1e-6): how well a proxy orders a group as the truth does, which is all GRPO's advantages use."""
    from viva_base.data.toyworld.oracle import spearman

    from editgrpo.rollout import rollout
    from editgrpo.sampling import sigma_schedule

    recs = records[:groups]
    sigmas = sigma_schedule(num_steps, editor.config.shift)
    spreads: dict[str, list[float]] = {}
    means: dict[str, list[float]] = {}
    ranks: dict[str, list[float]] = {}
    for gi, rec in enumerate(recs):
        item = _load(rec)
        src = item["source"][None].to(editor.device)
        cond, uncond = editor.encode_condition(src, [rec["instruction"]], [None])
        ro = rollout(editor, cond, uncond, [0] * group_size, [seed * 1_000_003 + gi * 1000 + k for k in range(group_size)],
                     sigmas, mode="sde", method=method, eta=eta, sde_window=sde_window, train_steps=[],
                     guidance_scale=guidance_scale, batch_size=group_size)
        edited = editor.decode(ro.latents).cpu()
        scores: dict[str, torch.Tensor] = {}
        if "target" in item and "mask" in item:  # against the best correct edit (several for an open instruction)
            truths = record_truths(rec, item["target"], item["mask"])
            o = best_oracle_scores(edited, item["source"].expand_as(edited), [truths] * edited.shape[0])
            scores.update({k: o[k] for k in ("oracle", "if_error", "sp_error")})
        if reward_fn is not None:
            n = edited.shape[0]
            out = reward_fn(edited, item["source"].expand_as(edited),
                            source_captions=[rec.get("source_caption", "")] * n,
                            target_captions=[rec.get("target_caption", "")] * n,
                            instructions=[rec["instruction"]] * n, references=[None] * n)
            scores["reward"] = out.total
            scores.update({f"reward/{k}": v for k, v in out.components.items()})
        for k, v in scores.items():
            v = v.float()
            spreads.setdefault(k, []).append(float(v.std(unbiased=False)))
            means.setdefault(k, []).append(float(v.mean()))
            if "oracle" in scores and group_size > 1 and min(float(v.std()), float(scores["oracle"].std())) > 1e-6:
                rho = spearman(v, scores["oracle"])  # (a spread of float rounding only is no ranking)
                if not math.isnan(rho):
                    ranks.setdefault(k, []).append(rho)
    rows = []
    for k, v in spreads.items():
        row = {"score": k, "mean": sum(means[k]) / len(means[k]), "within_group_std": sum(v) / len(v)}
        if ranks.get(k):
            row["rank_vs_oracle"] = sum(ranks[k]) / len(ranks[k])
        rows.append(row)
    return {"groups": len(recs), "group_size": group_size, "rows": rows}


def resolve_toy_rewards(rewards: dict, output_dir, recipe: str) -> dict:
    """``model: toy`` (the toy chain's CLIP, as in ``recipes/toy.yaml``) -> the one the chain trained in the
    recipe's ``output_dir/reward_model``; a clear error when the chain has not made it yet."""
    from viva_base.errors import UserError

    out = {}
    for name, entry in rewards.items():
        if isinstance(entry, dict) and entry.get("model") == "toy":
            where = Path(output_dir or "outputs/toy") / "reward_model"
            if not (where / "open_clip_config.json").exists():
                raise UserError(f"--rewards {recipe}: rewards.{name}.model=toy is the toy chain's CLIP, not found in "
                                f"{where}; run `python -m editgrpo.train recipe={recipe}` first")
            entry = {**entry, "model": f"open_clip:local-dir:{where.absolute()}"}
        out[name] = entry
    return out


def format_tables(result: dict) -> str:
    lines = []
    if "clean_latent" in result:
        c = result["clean_latent"]
        lines += [f"clean-latent error |x0_pred - x0| on {c['n']} records (latent std {c['latent_std']:.3f}; "
                  f"copying the source errs {c['copy_source_inside']:.3f} inside the edit region)",
                  "| sigma | inside the edit region | outside |", "|---|---|---|"]
        lines += [f"| {r['sigma']:.2f} | {r['inside']:.4f} | {r['outside']:.4f} |" for r in c["rows"]]
    if "group_spread" in result:
        s = result["group_spread"]
        lines += ["", f"within-group spread of {s['group_size']} SDE samples, {s['groups']} prompts",
                  "| score | mean | within-group std | Spearman with the oracle in a group |", "|---|---|---|---|"]
        lines += [f"| {r['score']} | {r['mean']:.4f} | {r['within_group_std']:.4f} | "
                  f"{r['rank_vs_oracle']:+.2f} |" if "rank_vs_oracle" in r else
                  f"| {r['score']} | {r['mean']:.4f} | {r['within_group_std']:.4f} | - |" for r in s["rows"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    from viva_base.cli_args import count, noise_level, positive

    p = argparse.ArgumentParser(prog="python -m editgrpo.diagnose", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an editor directory (save_pretrained)")
    p.add_argument("--manifest", required=True, help="a pairs or eval manifest (records with target + mask)")
    p.add_argument("--max-items", type=count(1), default=64, help="records used for the clean-latent error")
    p.add_argument("--sigmas", type=noise_level, nargs="+", default=list(DEFAULT_SIGMAS),
                   help="noise levels in (0, 1] of the clean-latent error")
    p.add_argument("--groups", type=count(0), default=0, help="prompts for the within-group spread (0: skip it)")
    p.add_argument("--group-size", type=count(2), default=8, help="G, samples per prompt (>= 2: a spread)")
    p.add_argument("--num-steps", type=count(1), default=10)
    p.add_argument("--guidance-scale", type=positive, default=2.0, help="CFG scale (1: no CFG)")
    p.add_argument("--eta", type=positive, default=0.7, help="the SDE sampler's noise (> 0)")
    p.add_argument("--rewards", default=None, help="a recipe whose rewards block scores the group samples")
    p.add_argument("--lora", default=None, help="a LoRA folder or hub repo id to load onto the editor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    from viva_base.errors import UserError
    from viva_base.training import load_editor

    try:
        if args.out:
            from viva_base.recipe import check_output_file

            check_output_file("--out", args.out)  # before the editor loads and the samples are drawn
        records = read_manifest(args.manifest, "eval") if Path(args.manifest).exists() else None
        if records is None:
            raise UserError(f"--manifest {args.manifest}: no such file")
        rcfg = None
        if args.rewards:  # (read before the editor loads: a wrong path is one line at once)
            from viva_base.recipe import RecipeError, read_recipe_file

            try:
                recipe = read_recipe_file(args.rewards)
            except RecipeError as exc:
                raise UserError(f"--rewards: {exc}") from None
            if not isinstance(recipe.get("rewards"), dict):
                raise UserError(f"--rewards {args.rewards}: the recipe has no rewards block")
            rcfg = {k: v for k, v in recipe["rewards"].items() if not (isinstance(v, dict) and v.get("manifest"))}
            rcfg = resolve_toy_rewards(rcfg, recipe.get("output_dir"), args.rewards)
        editor = load_editor(args.model)
        if args.lora:
            from viva_base.peft_utils import load_lora

            load_lora(editor.transformer, args.lora)
        reward_fn = None
        if rcfg is not None:
            from rewards.registry import CombinedReward

            try:
                reward_fn = CombinedReward.from_config(rcfg)
            except OSError as exc:
                raise UserError(f"--rewards {args.rewards}: {exc}") from None
        result = {"model": args.model, "manifest": args.manifest}
        have_targets = [r for r in records if r.get("target") and r.get("mask")]
        if have_targets:
            result["clean_latent"] = clean_latent_errors(editor, have_targets[: args.max_items], args.sigmas,
                                                         seed=args.seed)
        if args.groups:
            result["group_spread"] = group_spread(editor, records, groups=args.groups, group_size=args.group_size,
                                                  num_steps=args.num_steps, guidance_scale=args.guidance_scale,
                                                  eta=args.eta, reward_fn=reward_fn, seed=args.seed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_tables(result))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2))  # (its folder created)
    return 0


if __name__ == "__main__":
    from viva_base.errors import exit_with

    exit_with(main)
