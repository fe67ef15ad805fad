"""GRPO / GSPO for a video VLM, hand-written: group rollouts, advantages, clipped surrogate, k3 KL.

A library (no loop over a dataset, no checkpoints, no argument parsing): one group's rollouts
(G samples from one shared prefill, scored by rewards.py), group-normalized advantages, the
per-group loss and the per-step metrics of a batch of groups. The RL loop that calls them, one
screen next to the paper's Algorithm 1, is train.py's `rl_rollouts` / `rl_update`; VisionCoach's
extra term comes from distill.py. With --coach=none this file alone is plain GRPO/GSPO.

    torchrun --standalone --nproc_per_node=2 train.py --stage=rl --model=runs/default/sft/last
    python -m pytest tests/test_grpo.py tests/test_rl.py

What we keep from GRPO (Shao et al. 2024) and GSPO (Zheng et al. 2025), and where we depart:
- Advantage: A_g = (r_g - mean_G r) / (std_G r + 1e-4), one scalar per completion, std with
  Bessel's correction off (population std), no value model. Kept from GRPO. --adv_std=false
  drops the division (Liu et al. 2025, "Dr. GRPO"): the std turns a group whose totals differ only
  by a temporal hair (1.96 against 1.99) into advantages as large as a right-against-wrong answer.
- Ratio: by default GSPO's sequence-level ratio s_g = exp(mean_t [log pi(y_t) - log pi_old(y_t)])
  (length-normalized), clipped to 1 +/- clip_eps, one surrogate per sequence: -min(s A, clip(s) A).
  --ratio=token gives GRPO's per-token ratio with the same clip.
- Aggregation: sequence mode averages the per-sequence surrogates over the group; token mode
  averages each sequence's tokens first, then sequences (GRPO's "sequence mean of token means").
  Groups are then averaged over the global batch (every prompt weighs the same).
- KL: k3 estimator exp(q - p) - (q - p) - 1 with q = log pi_ref, p = log pi, per token, averaged
  over each sequence's tokens, weight beta, added to the loss (GRPO), in both ratio modes
  (GSPO drops the KL term; we keep it because the paper's release trains with beta = 0.04).
- Old log-probs: with inner_updates = 1 the rollouts are on-policy, so pi_old = pi detached and
  the ratio is exactly 1 (its gradient is still the policy gradient); with more inner updates the
  old log-probs are computed once, before the first update, and kept.
- Zero-variance groups (all rewards equal) get zero advantage and contribute only the KL term.
- Completions that hit max_new_tokens are kept and scored as written (a truncated completion has
  no closing tags, so the format and grounding rewards already pay nothing for it).
- Shared prefix: the prompt (thousands of visual tokens) is run once per group in generation and
  in the policy and reference forwards; the G completions attend to its expanded KV cache
  (model.shared_prefix_logprobs). --shared_prefix=false runs the plain repeated computation.
- Many groups at once: a step's prompts are decoded together (`rollouts`, --batch_prompts) and
  several groups share one log-prob forward (`groups_loss`, --logprob_batch); each prompt is still
  run once, and with per-prompt generators a group's tokens do not depend on its batch mates.

Pure pieces (tested with hand-computed values): `group_advantages`, `k3_kl`, `policy_loss`.
"""
import hashlib
from dataclasses import dataclass

import torch

import model
import rewards


# ---------------------------------------------------------------------------------------------
# Pure math: advantages, KL, the clipped surrogate
# ---------------------------------------------------------------------------------------------

RATIOS = ("sequence", "token")     # GSPO's sequence-level ratio | GRPO's per-token ratio


def group_advantages(rewards, eps=1e-4, scale=True):
    """rewards (..., G) -> (r - mean) / (std + eps) over the last axis; zero for equal rewards.
    scale=False: r - mean only (Dr. GRPO), so a group whose rewards differ by a hair is not blown
    up to the same size of update as one whose answers differ."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(-1, unbiased=False, keepdim=True) + eps)


def k3_kl(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref): exp(q - p) - (q - p) - 1 >= 0, 0 when equal."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def masked_mean(x, mask, dim=-1):
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def policy_loss(logp, old_logp, ref_logp, adv, mask, clip_eps=0.2, beta=0.04, ratio="sequence"):
    """The clipped surrogate plus beta * k3 KL for one group.

    logp, old_logp, ref_logp: (G, C) per-token log-probs (ref may be None when beta == 0);
    adv: (G,); mask: (G, C) 1 on completion tokens. Returns (scalar loss, metrics dict).
    """
    mask = mask.to(logp.dtype)
    log_ratio = logp - old_logp                                              # (G, C)
    if ratio == "sequence":
        r = torch.exp(masked_mean(log_ratio, mask))                          # (G,)
        surrogate = -torch.min(r * adv, r.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (G,)
        clipped = ((r - 1).abs() > clip_eps).float().mean()
    elif ratio == "token":
        r = torch.exp(log_ratio)                                             # (G, C)
        a = adv[:, None]
        surrogate = masked_mean(-torch.min(r * a, r.clamp(1 - clip_eps, 1 + clip_eps) * a), mask)  # (G,)
        clipped = masked_mean(((r - 1).abs() > clip_eps).float(), mask).mean()
    else:
        raise ValueError(f"ratio must be 'sequence' or 'token', got {ratio!r}")
    kl = masked_mean(k3_kl(logp, ref_logp), mask) if ref_logp is not None else torch.zeros_like(surrogate)
    loss = (surrogate + beta * kl).mean()
    return loss, {"pg_loss": surrogate.mean().item(), "kl": kl.mean().item(), "clip_frac": clipped.item()}


# ---------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------

@dataclass
class Sampling:
    """How completions are sampled (config.sampling builds it from the Config)."""
    n: int                   # completions per prompt (G)
    max_new_tokens: int
    temperature: float
    top_p: float


@dataclass
class Group:
    """One prompt and its G scored completions."""
    record: dict
    prompt: model.Prompt
    ids: torch.Tensor            # (G, C) completion tokens
    mask: torch.Tensor           # (G, C) bool
    truncated: torch.Tensor      # (G,) bool
    texts: list
    rewards: dict                # reward name -> list of G floats ("total" included)
    advantages: torch.Tensor = None  # (G,)
    old_logp: torch.Tensor = None    # (G, C)
    ref_logp: torch.Tensor = None    # (G, C)


def sample_generator(*keys, device="cpu"):
    """A generator seeded from (seed, step, sample index, ...): the same rollouts whatever the
    number of processes or the order prompts are visited in, so runs are reproducible."""
    digest = hashlib.sha256(repr(keys).encode()).hexdigest()   # stable across processes, unlike hash()
    return torch.Generator(device=device).manual_seed(int(digest[:15], 16))


def rollouts(vlm, tokenizer, prompts, records, sampling, reward_cfg, progress, generators=None, batch_prompts=1):
    """Sample sampling.n completions of every prompt and score them against its record -> list of Group.

    One generation call (model.generate_groups): batch_prompts prompts are decoded together, 1 is
    one prompt at a time. generators: one per prompt (or None); with them a prompt's completions do
    not depend on which prompts share its batch. progress (training progress in [0, 1]) drives the
    temporal-point reward's sigma.
    """
    how = model.Sampling(sampling.max_new_tokens, model.stop_token_ids(vlm, tokenizer), tokenizer.pad_token_id,
                         sampling.temperature, sampling.top_p, tuple(model.vision_token_ids(tokenizer)))
    outs = model.generate_groups(vlm, prompts, sampling.n, how, generators, batch_prompts)
    return [score_rollouts(tokenizer, p, r, out, reward_cfg, progress) for p, r, out in zip(prompts, records, outs)]


def rollout(vlm, tokenizer, prompt, record, sampling, reward_cfg, progress, generator=None):
    """rollouts of one prompt -> Group."""
    return rollouts(vlm, tokenizer, [prompt], [record], sampling, reward_cfg, progress, [generator])[0]


def score_rollouts(tokenizer, prompt, record, generated, reward_cfg, progress):
    """One prompt's (ids (G, C), mask (G, C), truncated (G,)), decoded and scored -> Group."""
    ids, mask, truncated = generated
    texts = [tokenizer.decode(row[m], skip_special_tokens=True) for row, m in zip(ids, mask)]
    ctx = rewards.RewardContext(frame_width=prompt.frame_size[0], frame_height=prompt.frame_size[1],
                                progress=progress)
    table = rewards.score_group(texts, record, ctx, reward_cfg)
    return Group(record, prompt, ids, mask, truncated, texts, table)


def group_logprobs(policy, group, shared_prefix):
    """(G, C) log-probs of the group's completions under `policy` (a model.LogProbModule)."""
    if shared_prefix:
        return policy(group.prompt, group.ids, mode="shared")
    rows = policy([group.prompt] * len(group.ids), list(group.ids), mode="plain")
    return torch.stack(rows)


def groups_logprobs(policy, groups, shared_prefix, logprob_batch=1):
    """[(G_i, C_i)] log-probs of many groups (or distill.SDExample: anything with .prompt and .ids),
    logprob_batch groups per forward; 1 (or the plain path) is group_logprobs per group."""
    if logprob_batch <= 1 or not shared_prefix:
        return [group_logprobs(policy, g, shared_prefix) for g in groups]
    return [lp for chunk in model.chunks(groups, logprob_batch)
            for lp in policy([g.prompt for g in chunk], [g.ids for g in chunk], mode="multi")]


def group_loss(policy, group, clip_eps, beta, ratio, shared_prefix):
    """policy_loss of one group under `policy`; pi_old is the group's old_logp when kept (more than
    one inner update), else the current log-probs detached (on-policy: the ratio is exactly 1)."""
    loss, metrics = groups_loss(policy, [group], clip_eps, beta, ratio, shared_prefix)
    return loss, metrics[0]


def groups_loss(policy, groups, clip_eps, beta, ratio, shared_prefix):
    """The SUM of group_loss over `groups`, their log-probs in one forward (the caller picks how many
    groups share it). -> (scalar loss, one metrics dict per group)."""
    logps = groups_logprobs(policy, groups, shared_prefix, len(groups))
    total, metrics = 0.0, []
    for g, logp in zip(groups, logps):
        old = g.old_logp if g.old_logp is not None else logp.detach()
        loss, m = policy_loss(logp, old, g.ref_logp, g.advantages, g.mask, clip_eps, beta, ratio)
        total, metrics = total + loss, metrics + [m]
    return total, metrics


# ---------------------------------------------------------------------------------------------
# Metrics of one step's groups (None marks a prompt that was skipped)
# ---------------------------------------------------------------------------------------------

def group_metrics(groups):
    """Reward means, advantage spread, zero-variance share, completion length, truncated share."""
    real = [g for g in groups if g is not None]
    names = sorted({k for g in real for k in g.rewards})
    row = {}
    for name in names:
        vals = [v for g in real for v in g.rewards.get(name, [])]
        row[f"reward/{name}"] = sum(vals) / max(1, len(vals))
    adv = torch.cat([g.advantages for g in real]) if real else torch.zeros(1)
    row["adv_std"] = adv.std(unbiased=False).item()
    flat = [float(torch.tensor(g.rewards["total"]).std(unbiased=False)) < 1e-6 for g in real]
    row["zero_var_share"] = sum(flat) / max(1, len(real))
    row["completion_len"] = sum(g.mask.sum().item() for g in real) / max(1, sum(len(g.mask) for g in real))
    row["truncated_share"] = sum(g.truncated.float().mean().item() for g in real) / max(1, len(real))
    return row
