"""VisionCoach: visual prompts on hard samples and self-distillation back into the raw-video policy.

A library of the pieces of the RL step that run only for hard samples (the paper's Algorithm 1);
train.py's `rl_rollouts` calls them in this order:
1. A group is hard when its mean total reward Rbar is below k (--hard_k): `is_hard`.
2. A visual prompt (vp) is chosen (--coach): the trained VP-Selector's cached prediction
   (selector.py), a random non-raw type, one fixed type (fixed:darken ...), or none (plain
   GRPO/GSPO): `Coach.choose`.
3. The vp is drawn on the key frames (`draw_vp`, prompt.py's drawing), its hint is appended to
   the question, and G new rollouts are sampled and scored (grpo.rollouts, all hard groups in one call).
4. Candidates are the prompted rollouts whose total reward beats Rbar; the top N by answer reward
   are kept (`select_candidates`), and alpha times their length-normalized NLL (`sd_nll`) is
   added to the GSPO loss in train.py's `rl_update`. The GSPO loss itself always stays on the raw
   rollouts. Inference never sees visual prompts or hints.

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

Pure pieces (tested directly): `is_hard`, `select_candidates`, `sd_nll`, `coach_counts`.
Test: python -m pytest tests/test_distill.py
"""
import random
from collections import Counter
from dataclasses import dataclass

import torch

import data
import prompt

COACH_MODES = ("selector", "random", "none") + tuple(f"fixed:{vp}" for vp in prompt.VISUAL_PROMPTS)
SD_CONDITIONS = ("prompted", "raw")   # what distilled completions are conditioned on


# ---------------------------------------------------------------------------------------------
# Pure pieces: the hard gate, the candidates, the self-distillation loss
# ---------------------------------------------------------------------------------------------

def mean_reward(totals):
    """Rbar: the mean total reward of a group's rollouts."""
    return sum(totals) / len(totals)


def is_hard(totals, k):
    """Algorithm 1's hard indicator I = [Rbar < k] on a group's total rewards."""
    return mean_reward(totals) < k


def select_candidates(raw_mean, prompted_totals, prompted_answers, top_n):
    """Indices of the prompted rollouts to distill: total > raw_mean, then top_n by answer reward."""
    candidates = [g for g, r in enumerate(prompted_totals) if r > raw_mean]
    candidates.sort(key=lambda g: -prompted_answers[g])   # stable: ties keep rollout order
    return candidates[:top_n]


def sd_nll(logp, mask):
    """Self-distillation loss: mean over sequences of the length-normalized NLL. (N, C) -> scalar.
    The caller weighs it by alpha."""
    mask = mask.to(logp.dtype)
    return (-(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


@dataclass
class SDExample:
    """Prompted completions to distill, with the model input they are conditioned on."""
    prompt: object           # model.Prompt (with the vp, or raw, per --sd_condition)
    ids: torch.Tensor        # (N, C)
    mask: torch.Tensor       # (N, C) bool


# ---------------------------------------------------------------------------------------------
# Drawing a visual prompt onto a decoded sample
# ---------------------------------------------------------------------------------------------

def draw_vp(video, record, vp, vp_cfg=None):
    """The VideoSample with visual prompt `vp` drawn on its key frames (a copy; raw: the same sample)."""
    if vp == "raw":
        return video
    frames = video.frames.clone()
    positions = [video.key_positions[kf["idx"]] for kf in record["key_frames"] if kf["idx"] in video.key_positions]
    boxes = [[b for bs in record["key_items"].get(str(kf["idx"]), {}).values() for b in bs]
             for kf in record["key_frames"] if kf["idx"] in video.key_positions]
    drawn = prompt.apply_visual_prompt(vp, [frames[p] for p in positions], boxes, [p + 1 for p in positions], vp_cfg)
    for p, f in zip(positions, drawn):
        frames[p] = f
    return data.VideoSample(frames, list(video.times), dict(video.key_positions), video.duration, video.source_size)


def can_prompt(record):
    """Visual prompts need key frames that carry key objects."""
    return bool(record.get("key_frames")) and any(record.get("key_items", {}).get(str(kf["idx"]))
                                                  for kf in record["key_frames"])


# ---------------------------------------------------------------------------------------------
# The coach: which visual prompt a hard sample gets
# ---------------------------------------------------------------------------------------------

class Coach:
    """Chooses the visual prompt for a hard sample (--coach). predictions: the VP-Selector's cached
    {record id: vp} (train.py reads them from the selector stage's predictions.json)."""

    def __init__(self, mode, predictions=None):
        if mode not in COACH_MODES or mode == "none":
            raise ValueError(f"coach mode {mode!r}: expected one of {', '.join(m for m in COACH_MODES if m != 'none')}")
        self.mode, self.predictions = mode, predictions or {}

    def choose(self, record, key=()):
        """-> (vp, why it fell back to raw, or None). key (seed, step, sample index) seeds --coach=random."""
        if not can_prompt(record):
            return "raw", "no_key_objects"
        if self.mode == "random":
            return random.Random(str(key)).choice(prompt.VISUAL_PROMPTS[1:]), None
        if self.mode.startswith("fixed:"):
            return self.mode.split(":", 1)[1], None
        vp = self.predictions.get(str(record["id"]))
        return (vp, None) if vp is not None else ("raw", "selector_miss")


def coach_counts(vp, fallback, raw_mean, prompted_totals, n_kept):
    """Counters of one hard group, for the RL metrics (summed over groups, then coach_summary)."""
    prompted_mean = mean_reward(prompted_totals)
    counts = Counter({"hard": 1, f"chosen/{vp}": 1, f"lift_sum/{vp}": prompted_mean - raw_mean,
                      f"lift_n/{vp}": 1, f"raw_sum/{vp}": raw_mean, f"prompted_sum/{vp}": prompted_mean,
                      "candidates": sum(r > raw_mean for r in prompted_totals), "kept": n_kept})
    if fallback:
        counts[f"fallback/{fallback}"] += 1
    return counts


def coach_summary(counts, n_groups):
    """Summed coach counters -> metrics: the hard share, mean lift per vp, the rest as counts."""
    out = {"coach/hard_share": counts.get("hard", 0) / max(1, n_groups)}
    for k, v in counts.items():
        if k.startswith("lift_sum/"):
            vp = k.split("/", 1)[1]
            out[f"coach/lift/{vp}"] = v / max(1, counts.get(f"lift_n/{vp}", 0))
        elif not k.startswith("lift_n/") and k != "hard":
            out[f"coach/{k}"] = v
    return out
