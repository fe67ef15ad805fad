"""GRPO / GSPO for a video VLM, hand-written: group rollouts, advantages, clipped surrogate, k3 KL.

    torchrun --standalone --nproc_per_node=2 train.py --stage=rl --model=runs/default/sft/last

Owns the RL stage: per prompt, G rollouts from one shared prefill, rewards (rewards.py),
group-normalized advantages, the loss, the update loop, and RL metrics. VisionCoach's extra term
(hard samples, visual prompts, self-distillation) comes from distill.py and is added to the loss
here; with --coach=none or --alpha=0 this file alone is plain GRPO/GSPO.

What we keep from GRPO (Shao et al. 2024) and GSPO (Zheng et al. 2025), and where we depart:
- Advantage: A_g = (r_g - mean_G r) / (std_G r + 1e-4), one scalar per completion, std with
  Bessel's correction off (population std), no value model. Kept from GRPO.
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
"""
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import data as D
import model as M
import rewards as R


# ---------------------------------------------------------------------------------------------
# Pure math: advantages, KL, the clipped surrogate
# ---------------------------------------------------------------------------------------------

def group_advantages(rewards, eps=1e-4):
    """rewards (..., G) -> (r - mean) / (std + eps) over the last axis; zero for equal rewards."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


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
class Group:
    """One prompt and its G scored completions."""
    record: dict
    prompt: M.Prompt
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


def rollout(model, tokenizer, record, prompt, cfg, progress, num_samples=None, generator=None):
    """Sample G completions of `prompt` and score them against `record`."""
    stop = M.stop_token_ids(model, tokenizer)
    ids, mask, truncated = M.generate(model, prompt, num_samples or cfg.group_size, cfg.max_new_tokens, stop,
                                      tokenizer.pad_token_id, cfg.temperature, cfg.top_p, generator,
                                      banned_ids=M.vision_token_ids(tokenizer))
    texts = [tokenizer.decode(row[m], skip_special_tokens=True) for row, m in zip(ids, mask)]
    ctx = R.RewardContext(frame_width=prompt.frame_size[0], frame_height=prompt.frame_size[1], progress=progress)
    table = R.score_group(texts, record, ctx, R.rules_config(cfg.reward_rules, cfg.reward_identity))
    return Group(record, prompt, ids, mask, truncated, texts, table)


def group_logprobs(policy, group, shared_prefix):
    """(G, C) log-probs of the group's completions under `policy` (a LogProbModule)."""
    if shared_prefix:
        return policy(group.prompt, group.ids, mode="shared")
    rows = policy([group.prompt] * len(group.ids), list(group.ids), mode="plain")
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# The RL stage
# ---------------------------------------------------------------------------------------------

@dataclass
class RLState:
    step: int = 0
    consecutive_bad: int = 0
    skipped: Counter = field(default_factory=Counter)


def stage_rl(cfg, rt, start_path):
    import distill
    import train as T
    out = os.path.join(cfg.out_dir, "rl")
    ckpt = os.path.join(out, "last")
    state = T.load_trainer_state(ckpt) if cfg.resume else None
    if state is not None and state.get("done"):
        T.log(rt, f"[rl] finished checkpoint found at {ckpt}; skipping")
        return ckpt
    ref_path = state["reference_path"] if state else os.path.abspath(start_path)
    model, tokenizer, vision = T.prepare_policy(cfg, rt, ckpt if state else start_path)
    # The frozen reference is the starting checkpoint; a resumed run reloads it from there.
    ref = M.load_policy(ref_path, rt.device, rt.dtype)[0].requires_grad_(False).eval() if cfg.beta > 0 else None
    records = T.load_train_records(cfg)
    coach = distill.Coach.from_config(cfg, records)
    opt, sched = T.make_optimizer(model, cfg.rl_lr, cfg.weight_decay, cfg.rl_steps, warmup=max(1, cfg.rl_steps // 20))
    policy, opt = rt.accelerator.prepare(M.LogProbModule(model), opt)
    st = RLState()
    if state:
        opt.load_state_dict(state["optimizer"]), sched.load_state_dict(state["scheduler"])
        T.set_rng_state(state["rng"])
        st = RLState(state["step"], 0, Counter(state["skipped"]))
        T.log(rt, f"[rl] resumed at step {st.step} from {ckpt}")
    os.makedirs(out, exist_ok=True)
    bar = tqdm(range(st.step, cfg.rl_steps), desc="rl", disable=not rt.main, initial=st.step, total=cfg.rl_steps)
    for step in bar:
        st.step = step
        metrics = rl_step(cfg, rt, policy, ref, tokenizer, vision, opt, sched, records, coach, st)
        if rt.main:
            reward = metrics.get("reward/total", float("nan"))   # absent when every sample was skipped
            bar.set_postfix(reward=f"{reward:.3f}", hard=f"{metrics.get('coach/hard_share', 0):.2f}")
            T.append_jsonl(os.path.join(out, "metrics.jsonl"), metrics)
        st.step = step + 1
        if st.step % cfg.save_every == 0 or st.step == cfg.rl_steps:
            if rt.main:
                T.save_checkpoint(ckpt, T.unwrap(rt, policy).model, tokenizer, vision,
                                  {"step": st.step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "rng": T.rng_state(), "skipped": dict(st.skipped), "done": st.step == cfg.rl_steps,
                                   "reference_path": ref_path,
                                   "config": dataclasses.asdict(cfg)})
            rt.accelerator.wait_for_everyone()
    T.log(rt, f"[rl] done: {cfg.rl_steps} steps -> {ckpt}")
    return ckpt


def step_prompt_ids(cfg, rt, n_records, step):
    """The global batch of prompt indices for `step` (a function of seed and step), this rank's share."""
    import train as T
    per_epoch = n_records // cfg.batch_size
    epoch, i = divmod(step, per_epoch)
    order = T.epoch_order(n_records, epoch + 10_000, cfg.seed)
    return order[i * cfg.batch_size:(i + 1) * cfg.batch_size][rt.rank::rt.world]


def full_params(policy):
    """Generation runs on the bare model: under FSDP / ZeRO-3 its shards are gathered first."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        if isinstance(policy, FSDP):
            return FSDP.summon_full_params(policy, writeback=False, recurse=True)
    except ImportError:
        pass
    if type(policy).__name__ == "DeepSpeedEngine":
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None)
    return nullcontext()


def rl_step(cfg, rt, policy, ref, tokenizer, vision, opt, sched, records, coach, st):
    """Rollouts for this rank's prompts, VisionCoach extras for the hard ones, inner updates."""
    import train as T
    t0 = time.time()
    model = T.unwrap(rt, policy).model
    progress = st.step / max(1, cfg.rl_steps)
    groups, sd_examples, coach_metrics, timing = [], [], Counter(), Counter()
    model.eval()
    with full_params(policy):
        rollouts(cfg, rt, model, tokenizer, vision, records, coach, st, progress, groups, sd_examples,
                 coach_metrics, timing)
    model.train()
    t = time.time()
    fb = update(cfg, rt, policy, ref, opt, sched, groups, sd_examples, st)
    timing["forward_backward"] += time.time() - t
    return step_metrics(cfg, rt, st, groups, coach_metrics, fb, timing, time.time() - t0, sched)


def rollouts(cfg, rt, model, tokenizer, vision, records, coach, st, progress, groups, sd_examples,
             coach_metrics, timing):
    """Raw rollouts for this rank's prompts, and VisionCoach's extras for the hard ones."""
    import train as T
    for idx in step_prompt_ids(cfg, rt, len(records), st.step):
        rec = records[idx]
        t = time.time()
        try:
            video = D.load_video_sample(rec, T.frame_config(cfg))
            prompt = T.build_prompt(rec, tokenizer, vision, cfg, video).to(rt.device, rt.dtype)
        except D.DataError as e:  # a file that passed the header check but fails to decode
            D.skip_bad_sample(st.skipped, cfg.max_bad_samples, e)
            groups.append(None)
            continue
        if len(prompt) > cfg.max_prompt_tokens:
            st.skipped["prompt_too_long"] += 1
            groups.append(None)
            continue
        g = rollout(model, tokenizer, rec, prompt, cfg, progress,
                    generator=sample_generator(cfg.seed, st.step, idx, device=rt.device))
        timing["generate"] += time.time() - t
        if bool(g.truncated.all()):
            st.skipped["all_truncated"] += 1
        g.advantages = group_advantages(torch.tensor(g.rewards["total"], dtype=torch.float32)).to(rt.device)
        groups.append(g)
        t = time.time()
        sd, cm = coach.coach_group(model, tokenizer, vision, cfg, rec, video, g, progress, rt, (cfg.seed, st.step, idx))
        sd_examples += sd
        coach_metrics.update(cm)
        timing["coach"] += time.time() - t


def update(cfg, rt, policy, ref, opt, sched, groups, sd_examples, st):
    """inner_updates optimizer steps over the same rollouts. Returns loss metrics."""
    import distill
    n_global = cfg.batch_size
    scale = rt.world / n_global            # DDP averages over ranks; every prompt weighs 1 / n_global
    with torch.no_grad():
        for g in groups:
            if g is None:
                continue
            g.ref_logp = group_logprobs(M.LogProbModule(ref), g, cfg.shared_prefix) if ref is not None else None
            g.old_logp = group_logprobs(policy, g, cfg.shared_prefix) if cfg.inner_updates > 1 else None
    sums = Counter()
    for inner in range(cfg.inner_updates):
        items = [("rl", g) for g in groups] + [("sd", e) for e in sd_examples]
        for k, (kind, item) in enumerate(items):
            sync = nullcontext() if k == len(items) - 1 else rt.accelerator.no_sync(policy)
            with sync:
                if item is None:
                    loss = zero_loss(policy)       # keeps DDP's backward count equal on every rank
                elif kind == "rl":
                    logp = group_logprobs(policy, item, cfg.shared_prefix)
                    old = item.old_logp if item.old_logp is not None else logp.detach()
                    loss, m = policy_loss(logp, old, item.ref_logp, item.advantages, item.mask,
                                          cfg.clip_eps, cfg.beta, cfg.ratio)
                    sums.update({k2: v / len(groups) for k2, v in m.items()})
                    loss = loss * scale
                else:
                    loss = cfg.alpha * distill.sd_loss(policy, item) * scale
                    sums["sd_loss"] += loss.item() / scale / max(1, cfg.alpha)
                rt.accelerator.backward(loss)
        if not finite_grads(rt, policy):
            opt.zero_grad(set_to_none=True)
            st.consecutive_bad += 1
            st.skipped["nonfinite_update"] += 1
            if st.consecutive_bad >= 5:
                raise RuntimeError(f"[rl] {st.consecutive_bad} updates in a row had NaN/inf loss or gradients "
                                   f"(step {st.step}); lower --rl_lr or check the data")
            continue
        st.consecutive_bad = 0
        sums["grad_norm"] += float(rt.accelerator.clip_grad_norm_(policy.parameters(), cfg.grad_clip)) / cfg.inner_updates
        opt.step()
        opt.zero_grad(set_to_none=True)
    sched.step()
    return sums


def zero_loss(policy):
    return sum(p.reshape(-1)[0] for p in policy.parameters() if p.requires_grad) * 0.0


def finite_grads(rt, policy):
    """True when every rank's gradients are finite (all ranks agree, so they skip together)."""
    ok = torch.tensor([1.0], device=rt.device)
    for p in policy.parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            ok.zero_()
            break
    return bool(rt.accelerator.reduce(ok, reduction="sum").item() == rt.world) if rt.world > 1 else bool(ok.item())


def step_metrics(cfg, rt, st, groups, coach_metrics, fb, timing, step_time, sched):
    """One JSON-able row per step: reward means, advantage spread, KL, clip, lengths, timings."""
    real = [g for g in groups if g is not None]
    names = sorted({k for g in real for k in g.rewards})
    row = {"step": st.step + 1, "lr": sched.get_last_lr()[0], "time/step": step_time}
    for name in names:
        vals = [v for g in real for v in g.rewards.get(name, [])]
        row[f"reward/{name}"] = sum(vals) / max(1, len(vals))
    adv = torch.cat([g.advantages for g in real]) if real else torch.zeros(1)
    row["adv_std"] = adv.std(unbiased=False).item()
    flat = [float(torch.tensor(g.rewards["total"]).std(unbiased=False)) < 1e-6 for g in real]
    row["zero_var_share"] = sum(flat) / max(1, len(real))
    row["completion_len"] = sum(g.mask.sum().item() for g in real) / max(1, sum(len(g.mask) for g in real))
    row["truncated_share"] = sum(g.truncated.float().mean().item() for g in real) / max(1, len(real))
    row.update({k: v for k, v in fb.items()})
    row.update({f"time/{k}": v for k, v in timing.items()})
    row.update(coach_summary(coach_metrics, len(real)))
    row.update({f"skipped/{k}": v for k, v in st.skipped.items()})
    if rt.world > 1:
        row = reduce_metrics(rt, row)
    if rt.main and cfg.sample_every and (st.step % cfg.sample_every == 0) and real:
        g = real[0]
        with open(os.path.join(cfg.out_dir, "rl", "samples.jsonl"), "a") as f:
            f.write(json.dumps({"step": st.step + 1, "id": g.record["id"], "question": g.record["question"],
                                "answer": g.record["answer"], "completions": g.texts,
                                "rewards": g.rewards}) + "\n")
    return row


def coach_summary(cm, n_groups):
    """Coach counters -> shares and mean lifts (distill.Coach counts, we divide)."""
    out = {"coach/hard_share": cm.get("hard", 0) / max(1, n_groups)}
    for k, v in cm.items():
        if k.startswith("lift_sum/"):
            kind = k.split("/", 1)[1]
            out[f"coach/lift/{kind}"] = v / max(1, cm.get(f"lift_n/{kind}", 0))
        elif not k.startswith("lift_n/") and k != "hard":
            out[f"coach/{k}"] = v
    return out


def reduce_metrics(rt, row):
    """Average each metric over the ranks that have it (ranks may log different coach keys)."""
    from accelerate.utils import gather_object
    rows = gather_object([row])
    keys = {k for r in rows for k in r}
    out = {}
    for k in sorted(keys):
        vals = [r[k] for r in rows if k in r]
        out[k] = row["step"] if k == "step" else sum(vals) if is_count(k) else sum(vals) / len(vals)
    return out


def is_count(key):
    """Metrics that are counts add up over ranks; everything else is a mean."""
    return key.startswith(("skipped/", "coach/chosen/", "coach/fallback/", "coach/raw_sum/",
                           "coach/prompted_sum/")) or key in ("coach/candidates", "coach/kept")
