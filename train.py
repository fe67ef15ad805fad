"""Training entry point: synthetic data, SFT cold start, VP-Selector, RL (GRPO/GSPO + VisionCoach).

    python train.py                                   # the main job: every stage on the embedded default
    torchrun --standalone --nproc_per_node=2 train.py --stage=sft
    torchrun --nproc_per_node=8 train.py --stage=rl --model=/ckpt/sft --data=/stgr/train.json --data_root=/stgr
    accelerate launch --config_file configs/fsdp.yaml train.py --stage=rl ...   # FSDP / ZeRO-3 for 7B

Owns: the config (one dataclass, `--field=value` overrides checked against the field's type),
process setup (torchrun / accelerate; a plain `python train.py` is one process), the SFT loop,
checkpoints (atomic, with optimizer, schedule and RNG state; exact resume) and the stage order.
The RL step lives in grpo.py, VisionCoach in distill.py, the VP-Selector in selector.py,
metrics in eval.py. Rank 0 alone prints, logs and saves; each rank owns whole samples (whole
groups in RL).
"""
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data as D
import model as M


@dataclass
class Config:
    stage: str = "all"            # all | data | sft | selector | rl | eval
    out_dir: str = "runs/default"  # checkpoints, metrics.jsonl, eval tables
    data_dir: str = "data/synth"  # synthetic data is generated here when missing
    train_json: str = ""          # STGR JSON; empty -> {data_dir}/train.json
    data_root: str = ""           # media root, or one per record `source` (a=/x,b=/y); empty -> the JSON's folder
    max_bad_samples: int = 20     # samples whose media fail mid-run are skipped and counted; one more stops the run
    model: str = ""               # checkpoint dir to start from; empty -> the previous stage's output
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:1 ...
    dtype: str = "auto"           # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    # frames
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 16
    max_pixels: int = 0           # per-frame pixel budget; 0 -> the checkpoint's preprocessor_config
    # synthetic data (stage data)
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 200
    difficulty: float = 0.5
    # SFT
    sft_epochs: float = 1.0
    batch_size: int = 8           # samples (SFT) or prompts (RL) per optimizer step, over all ranks
    grad_accum: int = 1           # SFT micro-batches per step (RL already runs one backward per group)
    lr: float = 2e-3
    sft_warmup: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    train_vision: bool = True     # False freezes the vision tower (the usual choice at 7B)
    # RL (grpo.py)
    rl_steps: int = 50
    rl_lr: float = 5e-5
    group_size: int = 4           # G rollouts per prompt
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 0.95
    beta: float = 0.04            # k3 KL weight to the frozen reference
    clip_eps: float = 0.2
    ratio: str = "sequence"       # sequence (GSPO) | token (GRPO)
    inner_updates: int = 1        # optimizer updates per batch of rollouts
    shared_prefix: bool = True    # prompt once per group (False: the plain repeated computation)
    max_prompt_tokens: int = 4096
    # VisionCoach (distill.py)
    coach: str = "selector"       # selector | random | fixed:<prompt> | none
    hard_k: float = 2.21          # hard when the group's mean total reward < hard_k
    alpha: float = 0.1            # self-distillation weight (0 turns it off)
    top_n: int = 2
    sd_condition: str = "prompted"  # prompted (paper) | raw
    reward_identity: str = "soft"  # object-name matching in the spatial reward: soft | strict | none
    reward_rules: str = "ours"    # ours | released: rewards.py's rules or the release's (an ablation arm)
    # selector (selector.py)
    selector_dir: str = ""        # where predictions.json lives; empty -> {out_dir}/selector
    selector_samples: int = 64    # samples labelled by the proxy (5 prompt types x selector_group answers)
    selector_group: int = 2
    # logging / checkpoints
    sample_every: int = 20        # RL: write one group's rollouts to samples.jsonl every N steps
    save_every: int = 100
    resume: bool = True
    eval_samples: int = 100       # test samples evaluated at the end of the main job (0: all)


def parse_args(argv, cfg=None):
    """`--field=value` overrides, each checked against the field's type."""
    cfg = cfg or Config()
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for arg in argv:
        key, eq, value = arg.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if not arg.startswith("--") or not eq or key not in fields:
            raise SystemExit(f"bad argument {arg!r}: expected --field=value with field one of {sorted(fields)}")
        kind = type(getattr(cfg, key))
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--{key} expects true/false, got {value!r}")
            parsed = value.lower() in ("true", "1")
        else:
            try:
                parsed = kind(value)
            except ValueError:
                raise SystemExit(f"--{key} expects {kind.__name__}, got {value!r}") from None
        setattr(cfg, key, parsed)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key}={getattr(cfg, key)!r}: expected one of {allowed}")
    try:
        frame_config(cfg)  # the frame settings are within data.py's limits
    except ValueError as e:
        raise SystemExit(f"frame settings: {e}") from None
    return cfg


CHOICES = {"stage": ("all", "data", "sft", "selector", "rl", "eval"), "ratio": ("sequence", "token"),
           "sd_condition": ("prompted", "raw"), "reward_identity": ("soft", "strict", "none"),
           "reward_rules": ("ours", "released")}


# ---------------------------------------------------------------------------------------------
# Process setup
# ---------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    accelerator: object
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int

    @property
    def main(self):
        return self.rank == 0


def setup_runtime(cfg):
    from accelerate import Accelerator
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    acc = Accelerator(cpu=cpu)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        dtype = torch.float32 if acc.device.type == "cpu" else torch.bfloat16
    torch.manual_seed(cfg.seed + acc.process_index)
    return Runtime(acc, acc.device, dtype, acc.process_index, acc.num_processes)


def log(rt, *args):
    if rt.main:
        print(*args, flush=True)


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic directory swap, exact resume
# ---------------------------------------------------------------------------------------------

def save_checkpoint(path, model, tokenizer, vision, state):
    """Write model (save_pretrained), tokenizer, vision config and trainer state to `path` atomically.

    Everything goes to path.tmp first; only a complete directory is renamed into place, so a
    crash mid-save leaves the previous checkpoint intact.
    """
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    vision.save(tmp)
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])


def load_trainer_state(path):
    f = os.path.join(path, "trainer_state.pt")
    return torch.load(f, weights_only=False) if os.path.isfile(f) else None


def warmup_cosine(step, total, warmup):
    """LR multiplier: linear warmup, then cosine to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr, weight_decay, total_steps, warmup):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total_steps, warmup))
    return opt, sched


# ---------------------------------------------------------------------------------------------
# Samples -> model inputs
# ---------------------------------------------------------------------------------------------

def frame_config(cfg):
    return D.FrameConfig(cfg.fps, cfg.min_frames, cfg.max_frames, cfg.max_pixels or D.MAX_FRAME_PIXELS)


def build_prompt(rec, tokenizer, vision, cfg, video=None, question=None):
    """Record (and optionally an already decoded / visually prompted VideoSample) -> model.Prompt."""
    video = video or D.load_video_sample(rec, frame_config(cfg))
    parts = D.render_prompt(question or rec["question"], video.times, video.duration)
    return M.tokenize_prompt(tokenizer, parts, video.frames, vision, cfg.max_pixels or None)


def sft_target_ids(rec, tokenizer, prompt, source_size):
    """The record's reasoning_process, boxes in pixels of the frame the model sees, ending in <|im_end|>."""
    if not rec.get("reasoning_process"):
        raise D.DataError(f"{D.origin(rec)}: field 'reasoning_process': missing (needed for SFT)")
    text = D.trace_to_frame_pixels(rec["reasoning_process"], source_size, prompt.frame_size, D.origin(rec))
    return torch.tensor(M.encode_text(tokenizer, text) + [tokenizer.convert_tokens_to_ids(D.IM_END)])


def sft_example(rec, tokenizer, vision, cfg):
    video = D.load_video_sample(rec, frame_config(cfg))
    prompt = build_prompt(rec, tokenizer, vision, cfg, video)
    D.check_prompt_length(len(prompt), cfg.max_prompt_tokens, D.origin(rec))
    return prompt, sft_target_ids(rec, tokenizer, prompt, video.source_size)


def sft_examples(records, ids, tokenizer, vision, cfg, skipped):
    """(prompt, target) pairs for records[ids]; a sample whose media fails is skipped and counted."""
    out = []
    for j in ids:
        try:
            out.append(sft_example(records[j], tokenizer, vision, cfg))
        except D.DataError as e:
            D.skip_bad_sample(skipped, cfg.max_bad_samples, e)
    return out


def epoch_order(n, epoch, seed):
    """The sample order of an epoch: a function of (seed, epoch) only, so resume replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def sft_loss(policy, batch):
    """Mean NLL per completion token over a batch of (prompt, target) pairs."""
    logps = policy([p for p, _ in batch], [t for _, t in batch], mode="plain")
    total = sum(lp.sum() for lp in logps)
    return -total / sum(len(t) for _, t in batch)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def stage_data(cfg, rt):
    """Generate the synthetic set (once; skipped when it exists) and build the tiny model."""
    import synth
    if rt.main and not os.path.isfile(os.path.join(cfg.data_dir, "test.json")):
        t0 = time.time()
        synth.generate(synth.SynthConfig(out=cfg.data_dir, n_train=cfg.n_train, n_val=cfg.n_val,
                                             n_test=cfg.n_test, seed=cfg.seed, difficulty=cfg.difficulty))
        log(rt, f"[data] generated {cfg.n_train}/{cfg.n_val}/{cfg.n_test} samples in {time.time() - t0:.1f}s "
                f"-> {cfg.data_dir}")
    base = os.path.join(cfg.out_dir, "base")
    if rt.main and not os.path.isfile(os.path.join(base, "config.json")):
        records = json.load(open(os.path.join(cfg.data_dir, "train.json")))
        model, _ = M.build_tiny_model(base, tokenizer_corpus(records), seed=cfg.seed)
        log(rt, f"[data] tiny Qwen2.5-VL: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters -> {base}")
    rt.accelerator.wait_for_everyone()
    return base


def tokenizer_corpus(records):
    """What the tiny tokenizer learns from: what it will read (the prompt's fixed text), questions
    and reasoning traces."""
    frame_text = "".join(p for p in D.render_prompt("", D.sample_times(8.0), 8.0) if isinstance(p, str))
    return [frame_text] * 50 + [r["question"] + " " + r.get("reasoning_process", r["answer"]) for r in records]


def load_train_records(cfg):
    """The training records, validated, with every media file's header checked (fail early)."""
    path = cfg.train_json or os.path.join(cfg.data_dir, "train.json")
    records = D.load_records(path, cfg.data_root or None)
    D.check_enough_records(records, cfg.batch_size, path)
    D.check_media(records)
    return records


def prepare_policy(cfg, rt, path):
    model, tokenizer, vision = M.load_policy(path, rt.device, rt.dtype)
    if cfg.max_pixels:
        vision.max_pixels = cfg.max_pixels
    model.model.visual.requires_grad_(cfg.train_vision)
    return model, tokenizer, vision


def stage_sft(cfg, rt, start_path):
    """Supervised cold start on reasoning_process: NLL on the assistant completion only."""
    out = os.path.join(cfg.out_dir, "sft")
    ckpt = os.path.join(out, "last")
    state = load_trainer_state(ckpt) if cfg.resume else None
    if state is not None and state.get("done"):
        log(rt, f"[sft] finished checkpoint found at {ckpt}; skipping")
        return ckpt
    model, tokenizer, vision = prepare_policy(cfg, rt, ckpt if state else start_path)
    records = load_train_records(cfg)
    per_rank = cfg.batch_size // rt.world
    if per_rank * rt.world != cfg.batch_size or per_rank % cfg.grad_accum:
        raise SystemExit(f"batch_size={cfg.batch_size} must split evenly over {rt.world} ranks x grad_accum={cfg.grad_accum}")
    steps_per_epoch = len(records) // cfg.batch_size
    total = max(1, int(cfg.sft_epochs * steps_per_epoch))
    opt, sched = make_optimizer(model, cfg.lr, cfg.weight_decay, total, cfg.sft_warmup)
    policy = M.LogProbModule(model)
    policy, opt = rt.accelerator.prepare(policy, opt)
    step, skipped = 0, Counter()
    if state:
        opt.load_state_dict(state["optimizer"]), sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, skipped = state["step"], Counter(state.get("skipped", {}))
        log(rt, f"[sft] resumed at step {step} from {ckpt}")
    os.makedirs(out, exist_ok=True)
    bar = tqdm(range(step, total), desc="sft", disable=not rt.main, initial=step, total=total)
    for step in bar:
        loss = sft_step(cfg, rt, policy, opt, sched, records, tokenizer, vision, step, steps_per_epoch, skipped)
        if rt.main:
            bar.set_postfix(loss=f"{loss:.3f}")
            append_jsonl(os.path.join(out, "metrics.jsonl"), {"step": step + 1, "loss": loss,
                                                              "lr": sched.get_last_lr()[0],
                                                              "skipped/bad_sample": skipped["bad_sample"]})
        if (step + 1) % cfg.save_every == 0 or step + 1 == total:
            if rt.main:
                save_checkpoint(ckpt, unwrap(rt, policy).model, tokenizer, vision,
                                {"step": step + 1, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "rng": rng_state(), "done": step + 1 == total, "skipped": dict(skipped),
                                 "config": dataclasses.asdict(cfg)})
            rt.accelerator.wait_for_everyone()
    log(rt, f"[sft] done: {total} steps, last loss {loss:.4f} -> {ckpt}")
    return ckpt


def unwrap(rt, policy):
    return rt.accelerator.unwrap_model(policy)


def sft_step(cfg, rt, policy, opt, sched, records, tokenizer, vision, step, steps_per_epoch, skipped):
    """One optimizer step: this rank's share of the global batch, in grad_accum micro-batches.
    A sample whose media fails is skipped and counted in `skipped` (data.skip_bad_sample)."""
    epoch, i = divmod(step, steps_per_epoch)
    order = epoch_order(len(records), epoch, cfg.seed)
    batch_ids = order[i * cfg.batch_size:(i + 1) * cfg.batch_size][rt.rank::rt.world]
    micro = len(batch_ids) // cfg.grad_accum
    total_loss = 0.0
    for k in range(cfg.grad_accum):
        batch = sft_examples(records, batch_ids[k * micro:(k + 1) * micro], tokenizer, vision, cfg, skipped)
        batch = [(p.to(rt.device, rt.dtype), t.to(rt.device)) for p, t in batch]
        with rt.accelerator.no_sync(policy) if k < cfg.grad_accum - 1 else nullcontext():
            # a micro-batch left empty still runs a backward, so every rank reduces the same number
            loss = sft_loss(policy, batch) if batch else \
                0.0 * sum(p.sum() for p in policy.parameters() if p.requires_grad)
            rt.accelerator.backward(loss / cfg.grad_accum)
        total_loss += loss.item() / cfg.grad_accum
    rt.accelerator.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total_loss


def main(argv):
    cfg = parse_args(argv)
    rt = setup_runtime(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    stages = ["data", "sft", "selector", "rl", "eval"] if cfg.stage == "all" else [cfg.stage]
    path = cfg.model
    for stage in stages:
        if stage == "data":
            path = stage_data(cfg, rt)
        elif stage == "sft":
            path = stage_sft(cfg, rt, path or os.path.join(cfg.out_dir, "base"))
        elif stage == "selector":
            import selector
            selector.stage_selector(cfg, rt, path or os.path.join(cfg.out_dir, "sft", "last"))
        elif stage == "rl":
            import grpo
            path = grpo.stage_rl(cfg, rt, path or os.path.join(cfg.out_dir, "sft", "last"))
        elif stage == "eval":
            import eval as E
            E.stage_eval(cfg, rt, path or os.path.join(cfg.out_dir, "rl", "last"))
        else:
            raise SystemExit(f"unknown --stage={stage}; expected all|data|sft|selector|rl|eval")


if __name__ == "__main__":
    main(sys.argv[1:])
