"""VisionCoach: visual prompts on hard samples and self-distillation back into the raw-video policy.

Owns the part of the RL step that runs only for hard samples (REFERENCE.md section 1, Algorithm 1):
1. A group is hard when its mean total reward Rbar is below k (--hard_k).
2. A prompt type is chosen (--coach): the trained VP-Selector's cached prediction (selector.py),
   a random non-raw type, one fixed type (fixed:darken ...), or none (plain GRPO/GSPO).
3. The prompt is drawn on the key frames (prompt.py), its hint is appended to the question, and
   G new rollouts are sampled and scored.
4. Candidates are the prompted rollouts whose total reward beats Rbar; the top N by answer reward
   are kept, and alpha times their length-normalized NLL is added to the GSPO loss (grpo.py). The
   GSPO loss itself always stays on the raw rollouts. Inference never sees prompts or hints.

Where we depart from or extend the paper's Algorithm 1:
- --sd_condition=raw distills the prompted completions conditioned on the RAW video and question
  (the policy learns to produce, without help, what it produced with help); the paper conditions
  on the prompted input (--sd_condition=prompted, the default).
- --alpha=0 keeps the prompted rollouts (scored and logged: the "prompts on, distillation off"
  ablation) but adds no loss term.
- A hard sample without key frames or key objects cannot be prompted: it falls back to raw
  (G new rollouts on the unchanged input, which can still yield positives) and the reason is
  counted; so is a selector cache miss.
- Ties in answer reward among candidates are broken by the lower rollout index (stable sort).

Pure pieces (tested directly): `select_candidates`, `sd_nll`. Test: python -m pytest tests/test_distill.py
"""
import json
import os
import random
from collections import Counter
from dataclasses import dataclass

import torch

import data as D
import prompt as P


# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------

def select_candidates(raw_mean, prompted_totals, prompted_answers, top_n):
    """Indices of the prompted rollouts to distill: total > raw_mean, then top_n by answer reward."""
    candidates = [g for g, r in enumerate(prompted_totals) if r > raw_mean]
    candidates.sort(key=lambda g: -prompted_answers[g])   # stable: ties keep rollout order
    return candidates[:top_n]


def sd_nll(logp, mask):
    """Self-distillation loss: mean over sequences of the length-normalized NLL. (N, C) -> scalar."""
    mask = mask.to(logp.dtype)
    return (-(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


# ---------------------------------------------------------------------------------------------
# Drawing a prompt onto a decoded sample
# ---------------------------------------------------------------------------------------------

def prompted_video(video, record, kind, cfg=None):
    """A copy of the VideoSample with prompt `kind` drawn on its key frames (others untouched)."""
    frames = video.frames.clone()
    positions = [video.key_positions[kf["idx"]] for kf in record["key_frames"] if kf["idx"] in video.key_positions]
    boxes = [[b for bs in record["key_items"].get(str(kf["idx"]), {}).values() for b in bs]
             for kf in record["key_frames"] if kf["idx"] in video.key_positions]
    drawn = P.apply_visual_prompt(kind, [frames[p] for p in positions], boxes, [p + 1 for p in positions], cfg)
    for p, f in zip(positions, drawn):
        frames[p] = f
    return D.VideoSample(frames, list(video.times), dict(video.key_positions), video.duration)


def can_prompt(record):
    """Visual prompts need key frames that carry key objects."""
    return bool(record.get("key_frames")) and any(record.get("key_items", {}).get(str(kf["idx"]))
                                                  for kf in record["key_frames"])


# ---------------------------------------------------------------------------------------------
# The coach
# ---------------------------------------------------------------------------------------------

@dataclass
class SDExample:
    """Prompted completions to distill, with the prompt they are conditioned on."""
    prompt: object           # model.Prompt (prompted or raw, per --sd_condition)
    ids: torch.Tensor        # (N, C)
    mask: torch.Tensor       # (N, C) bool


def sd_loss(policy, ex):
    """alpha-free SD loss of one example under the policy (a model.LogProbModule)."""
    return sd_nll(policy(ex.prompt, ex.ids, mode="shared"), ex.mask)


class Coach:
    """Chooses prompts for hard groups, runs the prompted rollouts, returns what to distill."""

    def __init__(self, mode, predictions=None):
        if not (mode in ("selector", "random", "none") or
                (mode.startswith("fixed:") and mode.split(":", 1)[1] in P.VISUAL_PROMPTS)):
            raise SystemExit(f"--coach={mode!r}: expected selector | random | none | fixed:<one of {P.VISUAL_PROMPTS}>")
        self.mode, self.predictions = mode, predictions or {}

    @classmethod
    def from_config(cls, cfg, records):
        predictions = None
        if cfg.coach == "selector":
            path = os.path.join(cfg.selector_dir or os.path.join(cfg.out_dir, "selector"), "predictions.json")
            if not os.path.isfile(path):
                raise SystemExit(f"--coach=selector needs {path}: run --stage=selector first "
                                 f"(or use --coach=random / fixed:darken / none)")
            with open(path) as f:
                predictions = json.load(f)
            promptable = [r for r in records if can_prompt(r)]
            missing = sum(str(r["id"]) not in predictions for r in promptable)
            if missing:
                print(f"[coach] selector cache {path} misses {missing} of {len(promptable)} promptable "
                      f"training ids; those fall back to raw (counted as coach/fallback/selector_miss)")
        return cls(cfg.coach, predictions)

    def choose(self, record, counts, key=()):
        if self.mode == "random":
            return random.Random(str(key)).choice(P.VISUAL_PROMPTS[1:])
        if self.mode.startswith("fixed:"):
            return self.mode.split(":", 1)[1]
        kind = self.predictions.get(str(record["id"]))
        if kind is None:
            counts["fallback/selector_miss"] += 1
            return "raw"
        return kind

    def coach_group(self, model, tokenizer, vision, cfg, record, video, group, progress, rt, key=()):
        """VisionCoach for one raw group. Returns (list of SDExample, Counter of metrics).

        key (seed, step, sample index) seeds the random prompt choice and the prompted rollouts.
        """
        import grpo
        import train as T
        counts = Counter()
        raw_mean = sum(group.rewards["total"]) / len(group.rewards["total"])
        if self.mode == "none" or raw_mean >= cfg.hard_k:
            return [], counts
        counts["hard"] += 1
        if can_prompt(record):
            kind = self.choose(record, counts, key)
        else:
            counts["fallback/no_key_objects"] += 1
            kind = "raw"
        counts[f"chosen/{kind}"] += 1
        video_p = prompted_video(video, record, kind) if kind != "raw" else video
        prompt_p = T.build_prompt(record, tokenizer, vision, cfg, video_p, P.add_hint(record["question"], kind))
        prompt_p = prompt_p.to(rt.device, rt.dtype)
        g = grpo.rollout(model, tokenizer, record, prompt_p, cfg, progress,
                         generator=grpo.sample_generator(*key, "coach", device=rt.device))
        totals, answers = g.rewards["total"], g.rewards.get("answer", [0.0] * len(g.texts))
        counts[f"lift_sum/{kind}"] += sum(totals) / len(totals) - raw_mean
        counts[f"lift_n/{kind}"] += 1
        counts[f"raw_sum/{kind}"] += raw_mean
        counts[f"prompted_sum/{kind}"] += sum(totals) / len(totals)
        chosen = select_candidates(raw_mean, totals, answers, cfg.top_n)
        counts["candidates"] += sum(r > raw_mean for r in totals)
        counts["kept"] += len(chosen)
        if not chosen or cfg.alpha <= 0:
            return [], counts
        target = prompt_p if cfg.sd_condition == "prompted" else group.prompt
        return [SDExample(target, g.ids[chosen], g.mask[chosen])], counts
