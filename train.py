"""Training entry point: synthetic data, perception pretraining (off by default), SFT cold start, VP-Selector,
RL (GRPO/GSPO + VisionCoach), eval.

    python train.py                                   # the main job: every stage on the embedded default
    python train.py --help                            # every knob, with its comment and default
    python train.py --pretrain_steps=3000             # a perception stage before SFT (probe.py's tasks)
    torchrun --standalone --nproc_per_node=2 train.py --stage=sft
    torchrun --nproc_per_node=8 train.py --stage=rl --model=/ckpt/sft --train_json=/stgr/train.json --data_root=/stgr
    accelerate launch --config_file configs/fsdp.yaml train.py --stage=rl ...   # FSDP / ZeRO-3 for 7B

Owns every loop, top to bottom: checkpoints (a step checkpoint committed by one rename, so a kill at
any instant leaves the newest complete one; the model folder apart from the optimizer, schedule and
RNG state; exact resume; under FSDP / ZeRO-3 the full weights gathered on every rank and the sharded
optimizer state) and the skeleton the training stages share, the perception stage, the SFT loop, the
VP-Selector's label-making and prediction loops, the RL step (`rl_rollouts` reads as the paper's
Algorithm 1, `rl_update` is the loss and the optimizer), and the stage order. The math lives in
libraries it calls: grpo.py (advantages, GSPO loss, rollouts), distill.py (hard gate, candidates, SD
loss, the coach), selector.py (scores, labels, head), model.py (what the model reads, generation,
log-probs); the config in config.py (re-exported here as train.Config). Rank 0 alone prints, logs
and saves; each rank owns whole samples (whole groups in RL).
"""
import dataclasses
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import config
import data
import distill
import eval
import grpo
import metrics
import model
import probe
import prompt
import rewards
import selector
import synth
from config import Config, Runtime, log, parse_args, setup_runtime  # noqa: F401  (train.Config is the one config)


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# Checkpoints: one rename commits a step checkpoint; recovery after a kill at any instant
# ---------------------------------------------------------------------------------------------
# A stage folder ({out_dir}/{stage}) holds
#   checkpoint-{step}/model/            the model folder a user uploads (model.save_model_folder)
#   checkpoint-{step}/trainer_state.pt  optimizer, schedule, RNG, step, skip counts: beside the model
#   last -> checkpoint-{newest}/model   a relative symlink, what the next stage and eval.py read
#   metrics.jsonl
# A save is written into checkpoint-{step}.tmp, fsynced, and renamed: a checkpoint-{step} name always
# holds a complete checkpoint. Old ones are renamed to .del before they are removed, and the newest is
# never removed. So after a kill at any instant the newest checkpoint-{step} is complete, and
# recover() (run before every resume) drops the .tmp / .del leftovers and points last at it.

TRAINER_STATE = "trainer_state.pt"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def save_checkpoint(folder, step, vlm, tokenizer, vision, state, keep, state_dict=None):
    """Write checkpoint-{step} into the stage folder, commit it with one rename, point last at it,
    then keep the newest `keep` checkpoints (0: all)."""
    tmp, final = os.path.join(folder, f"checkpoint-{step}.tmp"), os.path.join(folder, f"checkpoint-{step}")
    if os.path.exists(final):
        raise RuntimeError(f"{final} exists already: a run never saves the same step twice")
    remove(tmp)                                          # a save killed before its rename
    model.save_model_folder(os.path.join(tmp, "model"), vlm, tokenizer, vision, state_dict)
    torch.save(state, os.path.join(tmp, TRAINER_STATE))
    fsync_tree(tmp)
    os.replace(tmp, final)                               # the commit
    fsync_dir(folder)
    point_last(folder, final)
    for _, old in checkpoints(folder)[:-keep] if keep else []:
        retire(old)


def checkpoints(folder):
    """[(step, path)] of the complete checkpoints in a stage folder, oldest first."""
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := CHECKPOINT.fullmatch(name))] if os.path.isdir(folder) else []
    return sorted(found)


def point_last(folder, ckpt):
    """last -> ckpt's model folder, swapped in by a rename (a reader sees the old or the new target)."""
    link = os.path.join(folder, "last")
    remove(link + ".tmp")
    os.symlink(os.path.relpath(os.path.join(ckpt, "model"), folder), link + ".tmp")
    os.replace(link + ".tmp", link)
    fsync_dir(folder)


def retire(path):
    """Remove a checkpoint: renamed first, so a half-removed one never carries a checkpoint's name."""
    os.replace(path, path + ".del")
    remove(path + ".del")


def recover(folder):
    """Finish what a killed save left: drop .tmp / .del leftovers, point last at the newest complete
    checkpoint. -> that checkpoint's path, or None."""
    link = os.path.join(folder, "last")
    if os.path.isdir(link) and not os.path.islink(link):
        raise SystemExit(f"{link} is a checkpoint in the old layout (trainer state inside the model folder); "
                         f"its model loads with --model={link}, but it cannot be resumed: move it away")
    if not os.path.isdir(folder):
        return None
    for name in os.listdir(folder):
        if name == "last.tmp" or re.fullmatch(r"checkpoint-\d+\.(tmp|del)", name):
            remove(os.path.join(folder, name))
    done = checkpoints(folder)
    if not done:
        return None
    target = os.path.relpath(os.path.join(done[-1][1], "model"), folder)
    if not os.path.islink(link) or os.readlink(link) != target:
        point_last(folder, done[-1][1])
    return done[-1][1]


def remove(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def fsync_tree(root):
    """Every file, then every folder, on disk: the rename that follows must not outrun the data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])


def load_trainer_state(ckpt):
    """A checkpoint's trainer state, read with weights_only=True: tensors, numbers, strings and
    containers only, so a planted file cannot run code."""
    f = os.path.join(ckpt, TRAINER_STATE)
    if not os.path.isfile(f):
        raise SystemExit(f"{f}: missing, so {ckpt} is not a checkpoint train.py wrote; move it out of the way")
    try:
        return torch.load(f, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"{f}: refused, it is not a trainer state train.py writes (it holds objects that "
                         f"would run code when loaded: {str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError) as e:
        raise SystemExit(f"{f}: unreadable ({str(e).splitlines()[0]})") from None


def warmup_cosine(step, total, warmup):
    """LR multiplier: linear warmup, then cosine to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(cfg, vlm, lr):
    """AdamW, weight decay on matrices only."""
    params = [p for p in vlm.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2))


def make_schedule(opt, total_steps, warmup):
    """Warmup-cosine on the optimizer accelerate prepared. It is built after prepare because DeepSpeed
    rebuilds the param groups (a schedule made before would set learning rates on groups that are gone)."""
    while hasattr(opt, "optimizer"):          # accelerate's and DeepSpeed's wrappers -> the torch optimizer
        opt = opt.optimizer
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total_steps, warmup))


# ---------------------------------------------------------------------------------------------
# The skeleton SFT and RL share: resume point, policy + optimizer, per-step log and atomic save
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """A training stage in progress."""
    name: str                 # "sft" | "rl": its folder under out_dir
    ckpt: str                 # {out_dir}/{name}/last: the model the stage hands on
    policy: object            # model.LogProbModule, wrapped by accelerate (DDP / FSDP / ZeRO-3)
    tokenizer: object
    vision: object            # model.VisionProcessor
    opt: object
    sched: object
    start: int                # first step to run (> 0 when resumed)
    state: dict               # the trainer state resumed from ({} on a fresh start)
    skipped: Counter          # samples skipped so far, by reason (saved with every checkpoint)


def resume_point(cfg, rt, name):
    """(newest complete checkpoint, its trainer state), or (None, None) on a fresh start; rank 0
    first recovers from a save that was killed. A state with done=True means nothing to run."""
    folder = stage_dir(cfg, name)
    if rt.main:
        recover(folder)
    rt.accelerator.wait_for_everyone()
    done = checkpoints(folder)
    if not done:
        return None, None
    if not cfg.resume:
        raise SystemExit(f"--resume=false, but {folder} holds checkpoints of an earlier run "
                         f"({', '.join(os.path.basename(p) for _, p in done)}): pick another --out_dir or remove them")
    return done[-1][1], load_trainer_state(done[-1][1])


def finished(rt, name, resumed):
    """True (and says so) when the stage's newest checkpoint is its last: nothing left to run."""
    ckpt, state = resumed
    if state is not None and state.get("done"):
        log(rt, f"[{name}] finished checkpoint found at {ckpt}; skipping")
        return True
    return False


def start_model(resumed, start_path):
    """The model a stage loads: its checkpoint's when resumed, else the one it was handed."""
    ckpt, state = resumed
    return os.path.join(ckpt, "model") if state else start_path


def stage_dir(cfg, name):
    return os.path.join(cfg.out_dir, name)


def stage_model(cfg, name):
    """The model a stage hands on: {out_dir}/{name}/last, its newest checkpoint's model folder."""
    return os.path.join(stage_dir(cfg, name), "last")


def load_policy(cfg, rt, path, trainable=True):
    """A checkpoint as (model, tokenizer, vision) with cfg's pixel budget and attention. A trainable
    policy keeps fp32 master weights whatever the compute dtype (rt.autocast runs it in bf16; DeepSpeed
    and FSDP keep their own fp32 masters from these); a frozen one is loaded in the compute dtype."""
    dtype = torch.float32 if trainable else rt.dtype
    vlm, tokenizer, vision = model.load_policy(path, rt.device, dtype, cfg.attn_implementation)
    if cfg.max_pixels:
        vision.max_pixels = cfg.max_pixels
    vlm.model.visual.requires_grad_(cfg.train_vision)
    if trainable and cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing(vlm)
    return vlm, tokenizer, vision


def start_run(cfg, rt, name, loaded, resumed, lr, total, warmup):
    """Optimizer and schedule for the loaded policy, wrapped for the processes; resumed from
    `resumed` = (checkpoint, trainer state) when there is one. Trackers start here."""
    (vlm, tokenizer, vision), (ckpt, state) = loaded, resumed
    policy, opt = rt.accelerator.prepare(model.LogProbModule(vlm), make_optimizer(cfg, vlm, lr))
    sched = make_schedule(opt, total, warmup)   # after prepare: DeepSpeed rebuilds the param groups
    start = 0
    if state:
        if state["step"] >= total:
            raise SystemExit(f"[{name}] {ckpt} has done {state['step']} steps, but this config's schedule has "
                             f"{total} in all: to resume, give a schedule longer than the steps done "
                             f"(--sft_epochs / --rl_steps), or start anew with another --out_dir")
        load_optimizer_state(rt, policy, opt, state, shard_path(cfg, rt, name, state["step"]))
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = state["step"]
        log(rt, f"[{name}] resumed at step {start} from {ckpt}")
    os.makedirs(stage_dir(cfg, name), exist_ok=True)
    start_trackers(cfg, rt, name)
    return Run(name, stage_model(cfg, name), policy, tokenizer, vision, opt, sched, start, state or {},
               Counter((state or {}).get("skipped", {})))


def progress_bar(rt, run, total):
    return tqdm(range(run.start, total), desc=run.name, disable=not rt.main, initial=run.start, total=total)


def end_step(cfg, rt, run, step, total, metrics, extra_state=None):
    """After optimizer step `step` (1-based): rank 0 logs the metrics row (metrics.jsonl and the
    --report_to trackers); every save_every steps and at the end a checkpoint is saved."""
    if rt.main:
        append_jsonl(os.path.join(stage_dir(cfg, run.name), "metrics.jsonl"), metrics)
    if cfg.report_to != "none":
        rt.accelerator.log({f"{run.name}/{k}": v for k, v in metrics.items() if is_number(v)}, step=step)
    if step % cfg.save_every == 0 or step == total:
        save_run(cfg, rt, run, {"step": step, "scheduler": run.sched.state_dict(),
                                "rng": rng_state(), "done": step == total, "skipped": dict(run.skipped),
                                "config": dataclasses.asdict(cfg), **(extra_state or {})})


def save_run(cfg, rt, run, state):
    """The one place a training checkpoint is saved. Every rank calls it: FSDP / ZeRO-3 gather the full
    weights, and ZeRO-3 ranks each write their optimizer shard; then rank 0 writes the checkpoint."""
    weights = full_state_dict(rt, run.policy)
    state = {**state, "optimizer": save_optimizer_state(cfg, rt, run, state["step"])}
    if rt.main:
        save_checkpoint(stage_dir(cfg, run.name), state["step"], unwrap(rt, run.policy).model, run.tokenizer,
                        run.vision, state, cfg.keep_checkpoints, weights)
    rt.accelerator.wait_for_everyone()
    drop_old_shards(cfg, rt, run.name, state["step"])   # after the commit: a kill before it keeps the older shard


def start_trackers(cfg, rt, name):
    """--report_to: one tracker run per stage (accelerate's trackers: wandb project visioncoach,
    tensorboard files under {out_dir}/visioncoach), with the config; metric keys carry the stage."""
    if cfg.report_to != "none":
        rt.accelerator.init_trackers("visioncoach", config=dataclasses.asdict(cfg),
                                     init_kwargs={"wandb": {"name": f"{os.path.basename(cfg.out_dir)}/{name}"}})


def stop_trackers(rt):
    """Close this stage's tracker runs (accelerate's end_training would also end the process group)."""
    for tracker in rt.accelerator.trackers:
        tracker.finish()
    rt.accelerator.trackers = []


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def unwrap(rt, policy):
    return rt.accelerator.unwrap_model(policy)


def epoch_order(n, epoch, seed):
    """The sample order of an epoch: a function of (seed, epoch) only, so resume replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


# ---------------------------------------------------------------------------------------------
# Sharded policies (FSDP, DeepSpeed ZeRO-3): full weights, optimizer state, deferred steps
# ---------------------------------------------------------------------------------------------

def is_fsdp(policy):
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    return isinstance(policy, (FSDPModule, FullyShardedDataParallel))


def is_deepspeed(policy):
    return type(policy).__name__ == "DeepSpeedEngine"


def full_state_dict(rt, policy):
    """The policy's full weights, named as in the checkpoint (save_pretrained's state_dict). Every rank
    must call it: FSDP and ZeRO-3 gather the shards (a rank-0-only save would hang, or write empty
    partitions). Rank 0 gets the tensors on the CPU; the others may get an empty dict."""
    if is_fsdp(policy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:   # ZeRO-3: the gathered "16-bit" state dict (the parameters' own dtype); DDP / one process: unwrapped
        weights = rt.accelerator.get_state_dict(policy)
    return {k.removeprefix("model."): v for k, v in (weights or {}).items()}   # LogProbModule's prefix


def frozen(rt, vlm):
    """A frozen model every rank runs (the reference). Under ZeRO-3, from_pretrained has already
    partitioned it, so it gets an engine of its own (no optimizer) whose hooks gather each layer."""
    vlm.requires_grad_(False).eval()
    plugin = rt.accelerator.state.deepspeed_plugin if rt.accelerator is not None else None
    if plugin is None or plugin.zero_stage != 3:
        return vlm
    import deepspeed
    ds = {k: v for k, v in plugin.deepspeed_config.items() if k not in ("optimizer", "scheduler")}
    return deepspeed.initialize(model=vlm, config=ds)[0].module


def shard_path(cfg, rt, name, step):
    """ZeRO-3 keeps each rank's optimizer partition (fp32 masters included) in its own file, beside
    the checkpoint: no rank could hold them all."""
    return os.path.join(stage_dir(cfg, name), "optimizer_shards", f"step{step}.rank{rt.rank}.pt")


def save_optimizer_state(cfg, rt, run, step):
    """Every rank calls it. -> the optimizer state for trainer_state.pt (None under ZeRO-3, whose
    ranks each write their shard_path here)."""
    if is_deepspeed(run.policy):
        path = shard_path(cfg, rt, run.name, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(run.opt.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
        return None
    if is_fsdp(run.policy):   # gathered to rank 0 (full_state_dict + cpu_offload), as PyTorch documents
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(run.policy, run.opt.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return run.opt.state_dict()


def load_optimizer_state(rt, policy, opt, state, shard):
    if is_deepspeed(policy):
        if not os.path.isfile(shard):
            raise SystemExit(f"resume: {shard} missing (ZeRO-3 resumes with the world size it saved with)")
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        # weights_only, so a planted file cannot run code; the two DeepSpeed types a shard holds besides
        # tensors (an enum, a plain attribute holder) are allowed by name
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
            shard_state = torch.load(shard, weights_only=True)
        opt.load_state_dict([shard_state] * rt.world)   # ZeRO reads entry [rank]
    elif is_fsdp(policy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(policy, opt.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    elif state["optimizer"] is None:
        raise SystemExit(f"resume: {os.path.dirname(os.path.dirname(shard))} was saved under ZeRO-3 (its optimizer "
                         f"state is in per-rank shards); resume it with the same accelerate config and world size")
    else:
        opt.load_state_dict(state["optimizer"])


def drop_old_shards(cfg, rt, name, step):
    """After checkpoint `step` is in place, this rank's older optimizer shards go."""
    folder = os.path.join(stage_dir(cfg, name), "optimizer_shards")
    mine = f".rank{rt.rank}.pt"
    for f in os.listdir(folder) if os.path.isdir(folder) else []:
        if f.endswith(mine) and f != os.path.basename(shard_path(cfg, rt, name, step)):
            os.remove(os.path.join(folder, f))


@contextmanager
def defer_step(rt, policy):
    """A backward whose gradients add to the next one's: DDP skips its all-reduce (no_sync), and
    DeepSpeed, which steps inside accelerator.backward, waits for the step's last backward."""
    with rt.accelerator.no_sync(policy):
        rt.accelerator.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            rt.accelerator.gradient_state._set_sync_gradients(True)


# ---------------------------------------------------------------------------------------------
# What the model reads
# ---------------------------------------------------------------------------------------------

_MEDIA_CHECKED = set()  # (train JSON, its mtime, data_root) whose media this process has checked


def load_train_records(cfg):
    """The training records, validated, with every media file's header checked (fail early), once
    per file and process: the main job's SFT, selector and RL stages read the same file (2,000
    synthetic records take about 5 s to check)."""
    path = cfg.train_json or os.path.join(cfg.data_dir, "train.json")
    records = data.load_records(path, cfg.data_root or None)
    data.check_enough_records(records, cfg.batch_size, path)
    key = (os.path.abspath(path), os.path.getmtime(path), cfg.data_root)
    if key not in _MEDIA_CHECKED:
        data.check_media(records)
        _MEDIA_CHECKED.add(key)
    return records


def model_input(cfg, rt, tokenizer, vision, video, question):
    """model.model_input on this process's device and dtype, with cfg's pixel budget."""
    return model.model_input(tokenizer, vision, video, question, cfg.max_pixels or None).to(rt.device, rt.dtype)


def vp_input(cfg, rt, tokenizer, vision, record, video, vp):
    """The model input under visual prompt `vp`: drawn on the key frames, its hint beside the question."""
    video = distill.draw_vp(video, record, vp, config.vp_config(cfg))
    return model_input(cfg, rt, tokenizer, vision, video, prompt.add_hint(record["question"], vp, cfg.hint_position))


# ---------------------------------------------------------------------------------------------
# Stage data: the synthetic set and the tiny model
# ---------------------------------------------------------------------------------------------

def stage_data(cfg, rt):
    """Generate the synthetic set (once; skipped when it exists) and, with --base_model=tiny, build
    the tiny model."""
    written = all(os.path.isfile(os.path.join(cfg.data_dir, f)) for f in ("test.json", "vstar_train.json"))
    if rt.main and not written:  # (a set from before V-STAR chains joined SFT lacks vstar_train.json)
        t0 = time.time()
        synth.generate(cfg)
        log(rt, f"[data] generated {cfg.n_train}/{cfg.n_val}/{cfg.n_test} samples in {time.time() - t0:.1f}s "
                f"-> {cfg.data_dir}")
    elif written:
        check_drawn(cfg)
    base = base_model(cfg)
    if rt.main and cfg.base_model == "tiny" and not os.path.isfile(os.path.join(base, "config.json")):
        records = json.load(open(os.path.join(cfg.data_dir, "train.json")))
        vlm, _ = model.build_tiny_model(base, tokenizer_corpus(records), seed=cfg.seed)
        log(rt, f"[data] tiny Qwen2.5-VL: {sum(p.numel() for p in vlm.parameters()) / 1e6:.2f}M parameters -> {base}")
    rt.accelerator.wait_for_everyone()


def check_drawn(cfg):
    """A synthetic set found on disk must have been drawn as the flags ask: frames of the other
    --background would train silently on what the model (and the perception checkpoint) never saw,
    and MCQ options of the other --mcq_options would measure another task under the same name."""
    path = os.path.join(cfg.data_dir, "train.json")
    first = (json.load(open(path)) or [{}])[0]
    meta = first.get("meta")
    if not isinstance(meta, dict) or first.get("source") != "synth":
        return                                     # not a synthetic set: nothing to check
    # sets from before a field was written were drawn as its first choice
    for field, before in (("background", "flat"), ("mcq_options", "drawn")):
        drawn, asked = meta.get(field, before), getattr(cfg, field)
        if drawn != asked:
            raise SystemExit(f"{path}: record {first.get('id')!r}: meta.{field} is {drawn!r} but "
                             f"--{field}={asked}: pass --{field}={drawn}, or another --data_dir "
                             f"to generate a set with {field} {asked}")


def base_model(cfg):
    """The folder a fresh run starts from: {out_dir}/base (the random tiny model) or --base_model,
    read from the working directory or, failing that, from beside this file (the committed
    checkpoints/perception when train.py runs from elsewhere)."""
    if cfg.base_model == "tiny":
        return os.path.join(cfg.out_dir, "base")
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), cfg.base_model)
    return beside if not os.path.exists(cfg.base_model) and os.path.exists(beside) else cfg.base_model


def tokenizer_corpus(records):
    """What the tiny tokenizer learns from: what it will read (the prompt's fixed text), questions
    and reasoning traces."""
    frame_text = "".join(p for p in data.render_prompt("", data.sample_times(8.0), 8.0) if isinstance(p, str))
    return [frame_text] * 50 + [r["question"] + " " + r.get("reasoning_process", r["answer"]) for r in records]


# ---------------------------------------------------------------------------------------------
# Stage pretrain: perception on single frames, a stand-in for what a real VLM brings
# ---------------------------------------------------------------------------------------------

def perception_tasks(cfg):
    """The perception stage's tasks (probe.py's frames and clips of the synthetic world): the task mix
    from --pretrain_tasks, the distractor cap growing from 1 over the first half of the steps."""
    weights = {}
    for item in cfg.pretrain_tasks.split(","):
        task, _, w = item.partition(":")
        if task.strip() not in probe.TASKS:
            raise SystemExit(f"--pretrain_tasks: task {task.strip()!r} is not one of {', '.join(probe.TASKS)}")
        try:
            weights[task.strip()] = float(w)
        except ValueError:
            raise SystemExit(f"--pretrain_tasks: {item!r}: expected task:weight, e.g. find:1") from None
    if min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise SystemExit(f"--pretrain_tasks={cfg.pretrain_tasks!r}: weights must be >= 0 and not all 0")
    probe.check_events(cfg.pretrain_when_events, "--pretrain_when_events")
    probe.check_events(cfg.pretrain_qa_events, "--pretrain_qa_events")
    return probe.ProbeConfig(seed=cfg.seed, find_weight=weights.get("find", 0.0),
                             marked_weight=weights.get("marked", 0.0), list_weight=weights.get("list", 0.0),
                             at_weight=weights.get("at", 0.0), when_weight=weights.get("when", 0.0),
                             qa_weight=weights.get("qa", 0.0), letter_weight=weights.get("letter", 0.0),
                             when_events=cfg.pretrain_when_events, qa_events=cfg.pretrain_qa_events,
                             when_answer=cfg.pretrain_when_answer, qa_answer=cfg.pretrain_qa_answer,
                             max_distractors=cfg.pretrain_distractors,
                             curriculum_steps=cfg.pretrain_steps // 2,
                             background=cfg.background, prompt="short", eval_frames=32)


def perception_layout(run, tasks):
    """(frame prompt style, clip layout) of the perception samples: a model that reads the question
    before the frames (question_at before or both: probe.py's clip models) gets frames with the
    question first, the layout the probe taught it those skills in; any other, the stage's own. Clips
    are in the model's own layout, as its SFT records are: a skill a both-layout model learned with the
    question before the frames reached the records' second copy of the question only in part until
    the kept clips were shown that way too (docs/perception.md, session 17)."""
    first = run.vision.question_at != "after"
    return ("question_first" if first else tasks.prompt), run.vision.question_at


def perception_batch(cfg, rt, run, tasks, step, n, tag, level=None):
    """n (model input, target) pairs of the perception tasks (in perception_layout), with the
    distractor cap of pretraining step `level` (default: `step`). The frames are a function of (tag,
    seed, step, rank): fresh at every step, and a resumed run draws what an unbroken one would."""
    rng = random.Random(f"{tag}-{cfg.seed}-{step}-{rt.rank}")
    level = step if level is None else level
    style, layout = perception_layout(run, tasks)
    return [probe.encode(probe.training_sample(rng, tasks, level), run.tokenizer, run.vision, style,
                         layout=layout) for _ in range(n)]


def stage_pretrain(cfg, rt, start_path):
    """--pretrain_steps of probe.py's single-frame tasks (find a named object, name the one a visual
    prompt marks, list them all) on frames of the synthetic world drawn in memory, fresh at every
    step: the perception a real checkpoint brings from pretraining and the tiny model lacks. Visual
    prompts appear here generically, never with the RL questions. The SFT loss and the same
    checkpointed loop; 0 steps skips the stage and the model passes through."""
    if cfg.pretrain_steps <= 0:
        return start_path
    tasks = perception_tasks(cfg)
    resumed = resume_point(cfg, rt, "pretrain")
    if finished(rt, "pretrain", resumed):
        return stage_model(cfg, "pretrain")
    per_rank = cfg.pretrain_batch // rt.world
    if per_rank * rt.world != cfg.pretrain_batch:
        raise SystemExit(f"pretrain_batch={cfg.pretrain_batch} must split evenly over {rt.world} ranks")
    run = start_run(cfg, rt, "pretrain", load_policy(cfg, rt, start_model(resumed, start_path)), resumed,
                    cfg.pretrain_lr, cfg.pretrain_steps, cfg.sft_warmup)
    bar = progress_bar(rt, run, cfg.pretrain_steps)
    for step in bar:
        batch = perception_batch(cfg, rt, run, tasks, step, per_rank, "pretrain")
        with rt.autocast():
            loss = sft_loss(run.policy, [(p.to(rt.device, rt.dtype), t.to(rt.device)) for p, t in batch])
        rt.accelerator.backward(loss)
        rt.accelerator.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip)
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        end_step(cfg, rt, run, step + 1, cfg.pretrain_steps,
                 {"step": step + 1, "loss": loss.item(), "lr": run.sched.get_last_lr()[0]})
    stop_trackers(rt)
    # held-out frames (their own seed), greedy: what the stage taught. Every rank decodes the same
    # frames (sharded layers gather their weights in a collective forward); rank 0 writes.
    vlm = unwrap(rt, run.policy).model
    vlm.eval()
    with torch.no_grad(), full_params(run.policy), rt.autocast():
        style, layout = perception_layout(run, tasks)
        scores = probe.evaluate(vlm, run.tokenizer, run.vision, probe.held_out(tasks), style, device=rt.device,
                                max_new_tokens=probe.answer_tokens(tasks), layout=layout)
    vlm.train()
    scores = {k: round(v, 4) for k, v in scores.items() if k != "examples"}
    if rt.main:
        with open(os.path.join(stage_dir(cfg, "pretrain"), "heldout.json"), "w") as f:
            json.dump(scores, f, indent=1)
    log(rt, f"[pretrain] done: {cfg.pretrain_steps} steps, last loss {loss.item():.4f}; held-out frames: "
            f"{json.dumps(scores)} -> {run.ckpt}")
    return run.ckpt


# ---------------------------------------------------------------------------------------------
# Stage sft: supervised cold start on the reasoning traces
# ---------------------------------------------------------------------------------------------

def sft_target_ids(rec, tokenizer, inputs, source_size):
    """The record's reasoning_process, boxes in pixels of the frame the model sees, ending in <|im_end|>."""
    if not rec.get("reasoning_process"):
        raise data.DataError(f"{data.origin(rec)}: field 'reasoning_process': missing (needed for SFT)")
    text = data.trace_to_frame_pixels(rec["reasoning_process"], source_size, inputs.frame_size, data.origin(rec))
    return torch.tensor(model.encode_text(tokenizer, text) + [tokenizer.convert_tokens_to_ids(data.IM_END)])


def sft_example(rec, tokenizer, vision, cfg):
    """(model input, target ids) of one record, on the CPU. A V-STAR chain turn (vstar_chain_records)
    carries its earlier turns in 'history', their boxes put in pixels of the frame the model sees."""
    video, question = data.load_video_sample(rec, config.frames(cfg)), rec["question"]
    vp = sft_visual_prompt(rec, cfg)
    if vp != "raw":  # prompted frames in distribution before RL's coach shows them
        video, question = distill.draw_vp(video, rec, vp, config.vp_config(cfg)), prompt.add_hint(question, vp, cfg.hint_position)
    height, width = vision.target_size(*video.frames.shape[-2:], cfg.max_pixels or None)
    turns = [(data.trace_to_frame_pixels(a, video.source_size, (width, height), data.origin(rec), "history"), q)
             for a, q in rec.get("history", ())]
    inputs = model.model_input(tokenizer, vision, video, question, cfg.max_pixels or None, turns)
    data.check_prompt_length(len(inputs), cfg.max_prompt_tokens, data.origin(rec))
    return inputs, sft_target_ids(rec, tokenizer, inputs, video.source_size)


def sft_visual_prompt(rec, cfg):
    """The visual prompt an SFT record is shown with: a share --sft_vp_share of the records with key
    frames get one of the drawn types, uniformly; the draw depends on (seed, id) only."""
    rng = random.Random(f"sft-vp-{cfg.seed}-{rec['id']}")
    if not rec.get("key_frames") or rng.random() >= cfg.sft_vp_share:
        return "raw"
    return rng.choice([vp for vp in prompt.VISUAL_PROMPTS if vp != "raw"])


def vstar_chain_file(cfg):
    """The V-STAR-layout file whose chains join SFT, or None (see Config.sft_vstar)."""
    if cfg.sft_vstar_turns <= 0:
        return None
    if cfg.sft_vstar:
        return cfg.sft_vstar
    return None if cfg.train_json else os.path.join(cfg.data_dir, "vstar_train.json")


def vstar_chain_records(path, n, seed, data_root=""):
    """n of the file's chain turns (5 per clip, metrics.VSTAR_TURNS) as SFT records: the turn's
    first question, the earlier gold answers and questions as history, its gold completion
    (metrics.vstar_gold_completions) as reasoning_process. The draw depends on the seed only."""
    samples = metrics.load_vstar(path)
    slots = [(i, name) for i in range(len(samples)) for name in metrics.VSTAR_TURNS]
    picked = sorted(random.Random(f"vstar-sft-{seed}").sample(slots, min(n, len(slots))))
    root = data_root or os.path.dirname(os.path.abspath(path))
    out = []
    for i, name in picked:
        s, (asked, earlier) = samples[i], metrics.VSTAR_TURNS[name]
        where = f"{path}: sample {i} (vid={s.vid!r}) turn {name}"
        gold, questions = metrics.vstar_gold_completions(s), [getattr(s, q) for q in asked]
        out.append({"id": f"{s.vid}:{name}", "task": "V-STAR chain", "question": questions[0],
                    "history": list(zip([gold[t] for t in earlier], questions[1:])),
                    "reasoning_process": gold[name], "key_frames": [], "_origin": where,
                    "video_path": data.resolve_media(root, f"videos/{s.vid}.mp4", where, "vid")})
    return out


def sft_records(cfg):
    """The SFT set: the training records, then the V-STAR chain turns (vstar_chain_file)."""
    records = load_train_records(cfg)
    path = vstar_chain_file(cfg)
    if path is None:
        return records
    if not os.path.isfile(path):
        raise SystemExit(f"--sft_vstar: {path} not found (the synthetic set writes vstar_train.json; "
                         f"regenerate it, or --sft_vstar_turns=0 to train without V-STAR chains)")
    return records + vstar_chain_records(path, cfg.sft_vstar_turns, cfg.seed, cfg.data_root)


def sft_examples(records, ids, tokenizer, vision, cfg, skipped):
    """(model input, target) pairs for records[ids]; a sample whose media fails is skipped and
    counted in `skipped` (data.skip_bad_sample stops the run past max_bad_samples)."""
    out = []
    for j in ids:
        try:
            out.append(sft_example(records[j], tokenizer, vision, cfg))
        except data.DataError as e:
            data.skip_bad_sample(skipped, cfg.max_bad_samples, e)
    return out


@dataclass
class ClaimPointer:
    """SFT's claim pointer aid (--sft_attend_weight), as sft_loss takes it."""
    weight: float      # the aid's weight beside the NLL
    layer: int         # decoder layer (1-based) whose head 0 learns to point
    tags: tuple        # ids of <obj>, <box>, </box>, <t>, </t>
    decode: object     # ids -> text (the tokenizer's)
    merge: int         # the vision tower's spatial merge size
    rows: int          # samples of the micro-batch (the aid is a mean over them, like the NLL over tokens)
    log: list = field(default_factory=list)  # (summed -log mass, rows with a claim, the NLL) of each call


def claim_pointer(cfg, run, rows):
    """The ClaimPointer of this run's SFT micro-batch of `rows` samples, or None when the aid is off."""
    if cfg.sft_attend_weight <= 0:
        return None
    return ClaimPointer(cfg.sft_attend_weight, cfg.sft_attend_layer, model.claim_tags(run.tokenizer),
                        run.tokenizer.decode, run.vision.merge_size, rows)


def claim_pointer_nll(attn, batch, tags, decode, merge=2):
    """The claim pointer aid (SFT's --sft_attend_weight): for each (prompt, target) row of a plain
    forward whose head-0 attention is attn (B, L, L), -log of the attention mass that the positions
    predicting a claim's tokens put on its box (model.claim_attention), averaged over the row's claim
    tokens. -> (sum over rows with a claim, number of such rows)."""
    total, n = attn.new_zeros(()), 0
    for b, (p, t) in enumerate(batch):
        claims = model.claim_attention(attn[b], p, t.tolist(), tags, decode, merge)
        if claims:
            total = total - torch.cat([box for box, _ in claims]).clamp_min(1e-9).log().mean()
            n += 1
    return total, n


def sft_loss(policy, batch, n_tokens=None, pointer=None):
    """NLL of a batch of (model input, target) pairs per completion token: per token of the batch, or
    of n_tokens (a micro-batch's, when the batch is one of its pieces: the pieces' losses then add up
    to the micro-batch's). With a ClaimPointer, plus its weight x the claim pointer aid
    (claim_pointer_nll: head 0 of one layer learns to look at each claim's box in the frame at
    its time, so writing a claim reads the frame), summed over the batch's rows / pointer.rows."""
    prompts, targets = [p for p, _ in batch], [t for _, t in batch]
    if pointer is None:
        logps = policy(prompts, targets, mode="plain")
    else:
        logps, attn = policy(prompts, targets, mode="attention", layer=pointer.layer)
    nll = -sum(lp.sum() for lp in logps) / (n_tokens or sum(len(t) for t in targets))
    if pointer is None:
        return nll
    aid, n = claim_pointer_nll(attn, batch, pointer.tags, pointer.decode, pointer.merge)
    pointer.log.append((aid.item(), n, nll.item()))
    return nll + pointer.weight * aid / pointer.rows


def length_pieces(batch, size, full=0):
    """A micro-batch sorted by sequence length and cut into pieces of `size` (0: one piece), so each
    forward pads its rows to a nearby length (on this CPU padding was 22% of an SFT batch's tokens).
    Empty pieces are added up to what a micro-batch of `full` samples would have, so a rank that
    skipped a sample still runs as many forwards and backwards as the others (ZeRO-3 needs that)."""
    if size <= 0 or len(batch) <= size:
        pieces = [batch]
    else:
        batch = sorted(batch, key=lambda pt: len(pt[0]) + len(pt[1]))
        pieces = [batch[i:i + size] for i in range(0, len(batch), size)]
    expected = 1 if size <= 0 else max(1, -(-full // size))
    return pieces + [[] for _ in range(expected - len(pieces))]


def stage_sft(cfg, rt, start_path):
    """Supervised cold start on reasoning_process: NLL on the assistant completion only."""
    resumed = resume_point(cfg, rt, "sft")
    if finished(rt, "sft", resumed):
        return stage_model(cfg, "sft")
    loaded = load_policy(cfg, rt, start_model(resumed, start_path))
    records = sft_records(cfg)
    per_rank = cfg.batch_size // rt.world
    if per_rank * rt.world != cfg.batch_size or per_rank % cfg.grad_accum:
        raise SystemExit(f"batch_size={cfg.batch_size} must split evenly over {rt.world} ranks "
                         f"x grad_accum={cfg.grad_accum}")
    total = max(1, int(cfg.sft_epochs * (len(records) // cfg.batch_size)))
    run = start_run(cfg, rt, "sft", loaded, resumed, cfg.lr, total, cfg.sft_warmup)
    bar = progress_bar(rt, run, total)
    for step in bar:
        loss, aid = sft_step(cfg, rt, run, records, step)
        bar.set_postfix(loss=f"{loss:.3f}")
        end_step(cfg, rt, run, step + 1, total, {"step": step + 1, "loss": loss, "lr": run.sched.get_last_lr()[0],
                                                 "skipped/bad_sample": run.skipped["bad_sample"], **aid})
    stop_trackers(rt)
    log(rt, f"[sft] done: {total} steps, last loss {loss:.4f} -> {run.ckpt}")
    return run.ckpt


def sft_step(cfg, rt, run, records, step):
    """One optimizer step: this rank's share of the global batch, in grad_accum micro-batches.
    A sample whose media fails is skipped and counted in run.skipped (data.skip_bad_sample).
    -> (loss, {} or, with the claim pointer on, {'nll': the loss without the aid, 'attend_nll': its mean
    -log mass per sample with a claim})."""
    epoch, i = divmod(step, len(records) // cfg.batch_size)
    order = epoch_order(len(records), epoch, cfg.seed)
    batch_ids = order[i * cfg.batch_size:(i + 1) * cfg.batch_size][rt.rank::rt.world]
    micro = len(batch_ids) // cfg.grad_accum
    total_loss, pointed = 0.0, []   # pointed: the claim pointer's log, every piece of the step
    for k in range(cfg.grad_accum):
        batch = sft_examples(records, batch_ids[k * micro:(k + 1) * micro], run.tokenizer, run.vision, cfg,
                             run.skipped)
        frames = round(cfg.sft_perception * micro) if cfg.sft_perception > 0 else 0
        kept = []   # perception kept alive through SFT (at the stage's full distractor cap)
        if frames:
            kept = perception_batch(cfg, rt, run, perception_tasks(cfg), step, frames, f"sft{k}",
                                    level=cfg.pretrain_steps)
        batch, kept = ([(p.to(rt.device, rt.dtype), t.to(rt.device)) for p, t in part] for part in (batch, kept))
        # (samples, how many a full one holds, the tokens its NLL is divided by): one token mean over
        # records and perception samples, or with --sft_perception_weight each its own (a perception
        # answer of a few tokens beside traces of a hundred is about 1% of one mean)
        if cfg.sft_perception_weight > 0 and frames:
            groups = [(batch, micro, sum(len(t) for _, t in batch)),
                      (kept, frames, sum(len(t) for _, t in kept) / cfg.sft_perception_weight)]
        else:
            groups = [(batch + kept, micro + frames, sum(len(t) for _, t in batch + kept))]
        pieces = [(piece, n) for group, full, n in groups for piece in length_pieces(group, cfg.sft_forward_batch, full)]
        pointer = claim_pointer(cfg, run, micro + frames)
        for j, (piece, n_tokens) in enumerate(pieces):
            last = k == cfg.grad_accum - 1 and j == len(pieces) - 1  # only the step's last backward syncs
            with defer_step(rt, run.policy) if not last else nullcontext():
                # an empty piece (samples skipped) still runs a backward, so every rank runs the same number
                with rt.autocast():
                    loss = sft_loss(run.policy, piece, n_tokens, pointer) if piece else zero_loss(run.policy)
                rt.accelerator.backward(loss / cfg.grad_accum)
            total_loss += loss.item() / cfg.grad_accum
        if pointer is not None:
            pointed += pointer.log
    rt.accelerator.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip)
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    aid = {} if not pointed else {"nll": sum(x[2] for x in pointed) / cfg.grad_accum,
                                  "attend_nll": sum(x[0] for x in pointed) / max(1, sum(x[1] for x in pointed))}
    return total_loss, aid


# ---------------------------------------------------------------------------------------------
# Stage selector: label samples with a frozen proxy, train the head, predict a vp for every id
# ---------------------------------------------------------------------------------------------

def selector_dir(cfg):
    return cfg.selector_dir or os.path.join(cfg.out_dir, "selector")


def stage_selector(cfg, rt, proxy_path):
    """Make labels with the frozen proxy, train the head, cache a prediction for every training id
    RL will draw (--selector_predict=all: every training id)."""
    out = selector_dir(cfg)
    if os.path.isfile(os.path.join(out, "predictions.json")) and cfg.resume:
        log(rt, f"[selector] cached predictions found in {out}; skipping")
        return
    if rt.main:
        proxy = load_policy(cfg, rt, proxy_path, trainable=False)
        proxy[0].eval().requires_grad_(False)
        records = load_train_records(cfg)
        os.makedirs(out, exist_ok=True)
        features, labels, tables = selector_labels(cfg, rt, proxy, records, out)
        n_train = max(1, int(cfg.selector_train_share * len(labels)))
        head = selector.train_head(features[:n_train], labels[:n_train], cfg.selector_steps, cfg.selector_lr,
                                   cfg.seed, cfg.selector_hidden)
        report = {"label_counts": {vp: int((labels == i).sum()) for i, vp in enumerate(prompt.VISUAL_PROMPTS)},
                  "train": selector.evaluate_head(head, features[:n_train], labels[:n_train], tables[:n_train]),
                  "heldout": selector.evaluate_head(head, features[n_train:], labels[n_train:], tables[n_train:])
                  if len(labels) > n_train else None}
        torch.save(head.state_dict(), os.path.join(out, "head.pt"))
        if cfg.selector_predict == "rl":  # RL reads only these: the same predictions, fewer forwards
            records = rl_drawn(cfg, records)
        predictions = selector_predictions(cfg, rt, proxy, head, records)
        with open(os.path.join(out, "predictions.json"), "w") as f:
            json.dump(predictions, f)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        log(rt, f"[selector] {json.dumps(report)}")
    rt.accelerator.wait_for_everyone()


def selector_labels(cfg, rt, proxy, records, out):
    """Score every vp on selector_samples promptable records (labels.jsonl). -> features (N, D),
    labels (N,), score tables."""
    pool = [r for r in records if distill.can_prompt(r)]
    chosen = random.Random(cfg.seed).sample(pool, min(cfg.selector_samples, len(pool)))
    features, labels, tables = [], [], []
    bar = tqdm(total=len(chosen), desc="selector labels", disable=not rt.main)
    with open(os.path.join(out, "labels.jsonl"), "w") as f:
        for chunk in model.chunks(chosen, cfg.batch_prompts):
            for record, (scores, raw_inputs) in zip(chunk, vp_scores(cfg, rt, proxy, chunk)):
                label = selector.label_of(scores)
                f.write(json.dumps({"id": record["id"], "scores": scores, "label": label}) + "\n")
                features.append(selector.pooled_features(proxy[0], raw_inputs))
                labels.append(prompt.VISUAL_PROMPTS.index(label))
                tables.append(scores)
            bar.update(len(chunk))
    bar.close()
    return torch.stack(features).cpu(), torch.tensor(labels), tables


def vp_scores(cfg, rt, proxy, records):
    """selector.vp_score of every vp on each record (one decode of its video), and its raw model
    input (the selector's own input). -> [(scores, raw input)]. All records x vps are rolled out
    in one generation call (--batch_prompts decoded together), each from its own generator seeded
    from (seed, record id, vp), so a label does not depend on the batching."""
    vlm, tokenizer, vision = proxy
    inputs, gens = [], []
    for record in records:
        video = data.load_video_sample(record, config.frames(cfg))
        inputs += [vp_input(cfg, rt, tokenizer, vision, record, video, vp) for vp in prompt.VISUAL_PROMPTS]
        gens += [grpo.sample_generator(cfg.seed, "selector", str(record["id"]), vp, device=rt.device)
                 for vp in prompt.VISUAL_PROMPTS]
    n = len(prompt.VISUAL_PROMPTS)
    groups = grpo.rollouts(vlm, tokenizer, inputs, [r for r in records for _ in range(n)],
                           config.sampling(cfg, cfg.selector_group), config.reward_config(cfg), 0.0, gens,
                           cfg.batch_prompts)
    return [({vp: selector.vp_score(g.rewards) for vp, g in zip(prompt.VISUAL_PROMPTS, groups[i * n:(i + 1) * n])},
             inputs[i * n])                               # raw is first in VISUAL_PROMPTS
            for i in range(len(records))]


def selector_predictions(cfg, rt, proxy, head, records):
    """id -> the head's vp for every record that can be prompted."""
    vlm, tokenizer, vision = proxy
    predictions = {}
    for record in tqdm(records, desc="selector predict", disable=not rt.main):
        if distill.can_prompt(record):
            video = data.load_video_sample(record, config.frames(cfg))
            features = selector.pooled_features(vlm, model_input(cfg, rt, tokenizer, vision, video, record["question"]))
            predictions[str(record["id"])] = selector.predict(head, features)
    return predictions


# ---------------------------------------------------------------------------------------------
# Stage rl: GRPO/GSPO with VisionCoach (the paper's Algorithm 1)
# ---------------------------------------------------------------------------------------------

@dataclass
class RL:
    """What the RL step reads besides the Run."""
    ref: object               # the frozen reference model (the starting checkpoint), None when beta == 0
    records: list
    coach: object             # distill.Coach, None for --coach=none
    reward_cfg: object        # rewards.RewardConfig


def make_coach(cfg, records):
    """distill.Coach for --coach (None for none); --coach=selector reads the selector's predictions."""
    if cfg.coach == "none":
        return None
    predictions = None
    if cfg.coach == "selector":
        path = os.path.join(selector_dir(cfg), "predictions.json")
        if not os.path.isfile(path):
            raise SystemExit(f"--coach=selector needs {path}: run --stage=selector first "
                             f"(or use --coach=random / fixed:darken / none)")
        with open(path) as f:
            predictions = json.load(f)
        promptable = [r for r in rl_drawn(cfg, records) if distill.can_prompt(r)]
        missing = sum(str(r["id"]) not in predictions for r in promptable)
        if missing:
            print(f"[coach] selector cache {path} misses {missing} of the {len(promptable)} promptable "
                  f"training ids RL draws; those fall back to raw (counted as coach/fallback/selector_miss; "
                  f"--stage=selector --selector_predict=all --resume=false predicts every id)")
    return distill.Coach(cfg.coach, predictions)


def stage_rl(cfg, rt, start_path):
    resumed = resume_point(cfg, rt, "rl")
    if finished(rt, "rl", resumed):
        return stage_model(cfg, "rl")
    state = resumed[1]
    # The frozen reference is the starting checkpoint (its real folder, not the moving last link);
    # a resumed run reloads it from there.
    ref_path = state["reference_path"] if state else os.path.realpath(start_path)
    records = load_train_records(cfg)
    coach = make_coach(cfg, records)         # before the models: a missing selector stage fails in seconds
    loaded = load_policy(cfg, rt, start_model(resumed, start_path))
    ref = frozen(rt, load_policy(cfg, rt, ref_path, trainable=False)[0]) if cfg.beta > 0 else None
    rl = RL(ref, records, coach, config.reward_config(cfg))
    run = start_run(cfg, rt, "rl", loaded, resumed, cfg.rl_lr, cfg.rl_steps, config.rl_warmup(cfg))
    bad_in_a_row = 0
    bar = progress_bar(rt, run, cfg.rl_steps)
    for step in bar:
        t0 = time.time()
        vlm = unwrap(rt, run.policy).model
        vlm.eval()
        with full_params(run.policy), rt.autocast():
            groups, sd_examples, coached, counts = rl_rollouts(cfg, rt, run, rl, step)
        vlm.train()
        t = time.time()
        losses, bad_in_a_row = rl_update(cfg, rt, run, rl.ref, groups, sd_examples, bad_in_a_row, step)
        counts.update({"time/forward_backward": time.time() - t, **losses.pop("skipped")})
        run.skipped.update({k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("skipped/")})
        scalars = {**losses, "time/step": time.time() - t0, **{f"skipped/{k}": v for k, v in run.skipped.items()},
                   **{k: v for k, v in counts.items() if k.startswith(("time/", "reward_skipped/"))}}
        row = rl_metrics(cfg, rt, run, step, groups, coached, scalars)
        reward = row.get("reward/total", float("nan"))   # absent when every sample was skipped
        bar.set_postfix(reward=f"{reward:.3f}", hard=f"{row.get('coach/hard_share', 0):.2f}")
        end_step(cfg, rt, run, step + 1, cfg.rl_steps, row, {"reference_path": ref_path})
    stop_trackers(rt)
    log(rt, f"[rl] done: {cfg.rl_steps} steps -> {run.ckpt}")
    return run.ckpt


def step_prompt_ids(cfg, rt, n_records, step):
    """The global batch of prompt indices for `step` (a function of seed and step), this rank's share."""
    return rl_batch(cfg, n_records, step)[rt.rank::rt.world]


def rl_batch(cfg, n_records, step):
    """The global batch of prompt indices for RL step `step`."""
    per_epoch = n_records // cfg.batch_size
    epoch, i = divmod(step, per_epoch)
    order = epoch_order(n_records, epoch + 10_000, cfg.seed)
    return order[i * cfg.batch_size:(i + 1) * cfg.batch_size]


def rl_drawn(cfg, records):
    """The records RL draws in its rl_steps, in file order (what the selector must predict)."""
    drawn = {i for step in range(cfg.rl_steps) for i in rl_batch(cfg, len(records), step)}
    return [records[i] for i in sorted(drawn)]


def rl_rollouts(cfg, rt, run, rl, step):
    """Steps 1-3 of Algorithm 1 on this rank's prompts. -> (groups, SD examples, coach counters,
    other counters: skipped/..., reward_skipped/..., time/...); a prompt too long, or one whose media
    fails to decode (counted in run.skipped by data.skip_bad_sample), is a None group. Rollouts of
    all prompts run in one generation call (--batch_prompts decoded together), and the hard groups'
    prompted rollouts in another; each prompt's draws come from its own generator, seeded from
    (seed, step, prompt index), so they do not depend on the batching."""
    vlm, tokenizer = unwrap(rt, run.policy).model, run.tokenizer
    progress = step / max(1, cfg.rl_steps)
    ids, counts = step_prompt_ids(cfg, rt, len(rl.records), step), Counter()
    t = time.time()
    loaded = [rl_input(cfg, rt, run, rl.records[idx], counts) for idx in ids]     # (video, Prompt) or None
    live = [k for k, x in enumerate(loaded) if x is not None]
    counts["time/inputs"] += time.time() - t
    # 1. G rollouts on the raw video and question of every prompt, their rewards R, group-normalized advantages
    t = time.time()
    raw = grpo.rollouts(vlm, tokenizer, [loaded[k][1] for k in live], [rl.records[ids[k]] for k in live],
                        config.sampling(cfg), rl.reward_cfg, progress,
                        [grpo.sample_generator(cfg.seed, step, ids[k], device=rt.device) for k in live],
                        cfg.batch_prompts)
    counts["time/generate"] += time.time() - t
    groups = [None] * len(ids)
    for k, group in zip(live, raw):
        if bool(group.truncated.all()):
            counts["skipped/all_truncated"] += 1
        counts.update(reward_skips(group))
        totals = torch.tensor(group.rewards["total"], dtype=torch.float32)
        group.advantages = grpo.group_advantages(totals, scale=cfg.adv_std).to(rt.device)  # (G,)
        groups[k] = group
    # 2. hard indicator I = [mean R < k]
    t = time.time()
    hard = [k for k in live if rl.coach and distill.is_hard(groups[k].rewards["total"], cfg.hard_k)]
    sd_examples, coached = rl_coach(cfg, rt, run, rl, step, [(ids[k], loaded[k][0], groups[k]) for k in hard],
                                    counts) if hard else ([], Counter())
    counts["time/coach"] += time.time() - t
    return groups, sd_examples, coached, counts


def warn_prompt_too_long(record, n_tokens, cfg):
    """Loud, on every rank that skips one (metrics.jsonl counts them as skipped/prompt_too_long): a
    pixel budget copied from a release can make most prompts too long, and RL would then learn nothing."""
    print(f"[rl] WARNING: {data.origin(record)}: prompt of {n_tokens} tokens > --max_prompt_tokens="
          f"{cfg.max_prompt_tokens}; skipped. Lower --max_pixels / --max_frames or raise --max_prompt_tokens.",
          file=sys.stderr, flush=True)


def rl_input(cfg, rt, run, record, counts):
    """(decoded video, model input) of one RL prompt, or None when it is skipped: media that fails
    to decode (data.skip_bad_sample) or a prompt over max_prompt_tokens (counted in `counts`)."""
    try:
        video = data.load_video_sample(record, config.frames(cfg))
        inputs = model_input(cfg, rt, run.tokenizer, run.vision, video, record["question"])
    except data.DataError as e:  # a file that passed the header check but fails to decode
        data.skip_bad_sample(run.skipped, cfg.max_bad_samples, e)
        return None
    if len(inputs) > cfg.max_prompt_tokens:
        counts["skipped/prompt_too_long"] += 1
        warn_prompt_too_long(record, len(inputs), cfg)
        return None
    return video, inputs


def rl_coach(cfg, rt, run, rl, step, hard, counts):
    """Step 3 of Algorithm 1 for the hard groups, hard = [(prompt index, video, raw group)]:
    -> (SD examples, coach counters). The prompted rollouts of all hard groups run in one
    generation call, each from its own generator (seed, step, index, "coach")."""
    vlm, tokenizer, vision = unwrap(rt, run.policy).model, run.tokenizer, run.vision
    # 3. a visual prompt on the key frames + its hint; G prompted rollouts, rewards R'
    choices = [rl.coach.choose(g.record, (cfg.seed, step, idx)) for idx, _, g in hard]     # (vp, fallback)
    inputs = [vp_input(cfg, rt, tokenizer, vision, g.record, video, vp)
              for (_, video, g), (vp, _) in zip(hard, choices)]
    gens = [grpo.sample_generator(cfg.seed, step, idx, "coach", device=rt.device) for idx, _, _ in hard]
    prompted = grpo.rollouts(vlm, tokenizer, inputs, [g.record for _, _, g in hard], config.sampling(cfg),
                             rl.reward_cfg, step / max(1, cfg.rl_steps), gens, cfg.batch_prompts)
    sd_examples, coached = [], Counter()
    for (_, _, group), (vp, fallback), p_inputs, p in zip(hard, choices, inputs, prompted):
        counts.update(reward_skips(p))
        # candidates C = {R' > mean R}; S = top N of C by answer reward
        raw_mean, totals = distill.mean_reward(group.rewards["total"]), p.rewards["total"]
        keep = distill.select_candidates(raw_mean, totals, p.rewards.get("answer", [0.0] * len(totals)), cfg.top_n)
        coached.update(distill.coach_counts(vp, fallback, raw_mean, totals, len(keep)))
        if keep and cfg.alpha > 0:
            condition = p_inputs if cfg.sd_condition == "prompted" else group.prompt
            sd_examples.append(distill.SDExample(condition, p.ids[keep], p.mask[keep]))
    return sd_examples, coached


def reward_skips(group):
    """Rewards that could not read their record, by reason (rewards.skip_reasons), as metric keys."""
    return Counter({f"reward_skipped/{k}": v for k, v in rewards.skip_reasons(group.rewards).items()})


def rl_update(cfg, rt, run, ref, groups, sd_examples, bad_in_a_row, step):
    """The loss of Algorithm 1 (steps 3-4), inner_updates times on the same rollouts:
        L = mean over the global batch of grpo.policy_loss(group) + alpha * mean of distill.sd_nll(S).
    --logprob_batch groups (or SD examples) share one forward and one backward, so that many
    groups' graphs are in memory at a time; gradients add up over the backwards, and under DDP only
    the last one syncs. -> (loss metrics with the skipped updates under "skipped", the number of
    NaN/inf updates in a row so far)."""
    scale = rt.world / cfg.batch_size      # DDP averages over ranks; every prompt weighs 1 / batch_size
    real = [g for g in groups if g is not None]
    with torch.no_grad(), rt.autocast():   # pi_ref, and pi_old when it must outlive the first update
        refs = (grpo.groups_logprobs(model.LogProbModule(ref), real, cfg.shared_prefix, cfg.logprob_batch)
                if ref is not None else [None] * len(real))
        olds = (grpo.groups_logprobs(run.policy, real, cfg.shared_prefix, cfg.logprob_batch)
                if cfg.inner_updates > 1 else [None] * len(real))
    real = [dataclasses.replace(g, ref_logp=r, old_logp=o) for g, r, o in zip(real, refs, olds)]
    # every rank runs at least one backward (the synced one), even with no group left
    chunks = model.chunks(real, cfg.logprob_batch) + model.chunks(sd_examples, cfg.logprob_batch) or [[]]
    sums, skipped = Counter(), Counter()
    for _ in range(cfg.inner_updates):
        for k, chunk in enumerate(chunks):
            with nullcontext() if k == len(chunks) - 1 else defer_step(rt, run.policy):
                with rt.autocast():
                    if not chunk:
                        loss = zero_loss(run.policy)
                    elif isinstance(chunk[0], grpo.Group):
                        loss, ms = grpo.groups_loss(run.policy, chunk, cfg.clip_eps, cfg.beta, cfg.ratio,
                                                    cfg.shared_prefix)
                        for m in ms:
                            sums.update({name: v / len(groups) / cfg.inner_updates for name, v in m.items()})
                        loss = loss * scale
                    else:
                        logps = grpo.groups_logprobs(run.policy, chunk, cfg.shared_prefix, len(chunk))
                        nlls = [distill.sd_nll(lp, ex.mask) for lp, ex in zip(logps, chunk)]
                        sums["sd_nll"] += sum(n.item() for n in nlls) / len(sd_examples) / cfg.inner_updates
                        loss = cfg.alpha * sum(nlls) * scale
                rt.accelerator.backward(loss)
        if not finite_grads(rt, run.policy):
            run.opt.zero_grad(set_to_none=True)
            bad_in_a_row += 1
            skipped["skipped/nonfinite_update"] += 1
            if bad_in_a_row >= cfg.max_bad_updates:
                raise RuntimeError(f"[rl] {bad_in_a_row} updates in a row had NaN/inf loss or gradients "
                                   f"(step {step}); lower --rl_lr or check the data")
            continue
        bad_in_a_row = 0
        grad_norm = rt.accelerator.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip)
        sums["grad_norm"] += float(grad_norm or 0.0) / cfg.inner_updates   # DeepSpeed: its own clip's norm
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
    run.sched.step()
    return {**sums, "skipped": skipped}, bad_in_a_row


def zero_loss(policy):
    """A backward with no sample, so every rank runs the same number. Under ZeRO-3 the parameters are
    empty partitions outside a forward and its hooks reduce per layer, so there is none to make."""
    if is_deepspeed(policy) and policy.zero_optimization_stage() == 3:
        raise RuntimeError("ZeRO-3: a rank has no sample for this backward (a prompt over --max_prompt_tokens "
                           "or media that failed to decode, see the warnings above); raise --max_prompt_tokens, "
                           "fix the record, or run this data with DDP / FSDP")
    return sum(p.reshape(-1)[0] for p in policy.parameters() if p.requires_grad) * 0.0


def finite_grads(rt, policy):
    """True when every rank's gradients are finite (all ranks agree, so they skip together)."""
    ok = torch.tensor([1.0], device=rt.device)
    for p in policy.parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            ok.zero_()
            break
    return bool(rt.accelerator.reduce(ok, reduction="sum").item() == rt.world) if rt.world > 1 else bool(ok.item())


@contextmanager
def full_params(policy):
    """Generation calls the bare model's modules, not the wrapper's forward, so shards are gathered
    first. FSDP2 (fully_shard): the root's own parameters are unsharded (each sharded layer unshards
    itself in its own forward); FSDP1: the same through summon_full_params(recurse=False), as its docs
    ask (recurse=True around a forward is unsupported); ZeRO-3: every parameter is gathered."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel as FSDP
    if isinstance(policy, FSDPModule):
        # FSDP2 sets up its hooks on the root's first forward; generation would make a layer the root
        policy._get_fsdp_state()._lazy_init()
        policy.unshard()
        try:
            yield
        finally:
            policy.reshard()
    elif isinstance(policy, FSDP):
        with FSDP.summon_full_params(policy, writeback=False, recurse=False):
            yield
    elif is_deepspeed(policy):
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None):
            yield
    else:
        yield


def rl_metrics(cfg, rt, run, step, groups, coached, scalars):
    """One JSON-able row per step: the groups' rewards and spreads, the coach's counters, and the
    step's other scalars (losses, timings; skipped/ counts are for the whole run), averaged or
    summed over ranks. Every sample_every steps rank 0 also writes one group's rollouts with their
    reward breakdown to samples.jsonl."""
    real = [g for g in groups if g is not None]
    row = {"step": step + 1, "lr": run.sched.get_last_lr()[0], **grpo.group_metrics(groups),
           **distill.coach_summary(coached, len(real)), **scalars}
    if rt.world > 1:
        row = reduce_metrics(rt, row)
    if rt.main and cfg.sample_every and (step % cfg.sample_every == 0) and real:
        g = real[0]
        append_jsonl(os.path.join(cfg.out_dir, "rl", "samples.jsonl"),
                     {"step": step + 1, "id": g.record["id"], "question": g.record["question"],
                      "answer": g.record["answer"], "completions": g.texts, "rewards": g.rewards})
    return row


def reduce_metrics(rt, row):
    """Average each metric over the ranks that have it (ranks may log different coach keys)."""
    rows = rt.gather(row)
    keys = {k for r in rows for k in r}
    out = {}
    for k in sorted(keys):
        vals = [r[k] for r in rows if k in r]
        out[k] = row["step"] if k == "step" else sum(vals) if is_count(k) else sum(vals) / len(vals)
    return out


def is_count(key):
    """Metrics that are counts add up over ranks; everything else is a mean."""
    return key.startswith(("skipped/", "reward_skipped/", "coach/chosen/", "coach/fallback/", "coach/raw_sum/",
                           "coach/prompted_sum/")) or key in ("coach/candidates", "coach/kept")


# ---------------------------------------------------------------------------------------------
# Stage eval and the stage order
# ---------------------------------------------------------------------------------------------

def stage_eval(cfg, rt, path):
    """The main job's last stage: the checkpoint on the synthetic test split and its V-STAR set."""
    bundle = load_policy(cfg, rt, path, trainable=False)
    bundle[0].eval()
    tables = {}
    for benchmark, name in (("stgr", "test.json"), ("vstar", "vstar_test.json")):
        ecfg = dataclasses.replace(cfg, model=path, eval_data=os.path.join(cfg.data_dir, name), benchmark=benchmark,
                                   eval_out=os.path.join(cfg.out_dir, "eval"))
        with torch.no_grad():
            tables[benchmark] = eval.evaluate(ecfg, bundle, rt)
    for benchmark, summary in tables.items():
        log(rt, f"\n[eval] {benchmark} on {cfg.data_dir} ({path}):\n" + metrics.format_markdown_table({path: summary}))
    return tables


# ---------------------------------------------------------------------------------------------
# Choosing k: how hard the validation prompts are for a checkpoint when RL starts
# ---------------------------------------------------------------------------------------------

def val_group_means(cfg, rt, bundle, n):
    """Mean total reward of G raw rollouts on each of the first n validation prompts, rewards at
    progress 0 (as when RL starts): the numbers --hard_k is compared against. bundle: a checkpoint
    from load_policy(..., trainable=False). -> (records, means)"""
    records = data.load_records(os.path.join(cfg.data_dir, "val.json"), cfg.data_root or None)[:n]
    return records, vp_group_means(cfg, rt, bundle, records, ("raw",))["raw"]


def vp_group_means(cfg, rt, bundle, records, vps=prompt.VISUAL_PROMPTS, draw="calibrate"):
    """{vp: mean total reward of G rollouts on each record with that visual prompt drawn on its key
    frames and its hint added}, rewards at progress 0. Each (record, vp) draws from its own
    generator, seeded from (seed, draw, id, vp): another `draw` gives fresh rollouts (a group's raw
    mean compared with its prompted ones should not be the draw that made it hard)."""
    vlm, tokenizer, vision = bundle
    vlm.eval()
    inputs, gens = [], []
    for r in records:
        video = data.load_video_sample(r, config.frames(cfg))
        inputs += [vp_input(cfg, rt, tokenizer, vision, r, video, vp) for vp in vps]
        gens += [grpo.sample_generator(cfg.seed, draw, str(r["id"]), vp, device=rt.device) for vp in vps]
    with torch.no_grad():
        groups = grpo.rollouts(vlm, tokenizer, inputs, [r for r in records for _ in vps], config.sampling(cfg),
                               config.reward_config(cfg), 0.0, gens, cfg.batch_prompts)
    return {vp: [distill.mean_reward(groups[i * len(vps) + j].rewards["total"]) for i in range(len(records))]
            for j, vp in enumerate(vps)}


def k_for_share(means, share):
    """The k at which `share` of these group means are hard (mean < k): a midpoint between the
    group means on either side of that quantile."""
    xs = sorted(means)
    i = min(max(round(share * len(xs)), 1), len(xs) - 1)
    return (xs[i - 1] + xs[i]) / 2


def main(argv):
    cfg = parse_args(argv)
    if cfg.pretrain_steps > 0 or cfg.sft_perception > 0:
        perception_tasks(cfg)      # a bad --pretrain_tasks stops the run before any stage
    if (cfg.stage in ("all", "pretrain", "sft") and not cfg.model and cfg.base_model != "tiny"
            and not os.path.isfile(os.path.join(base_model(cfg), "config.json"))):
        raise SystemExit(f"--base_model={cfg.base_model}: no config.json there; expected a model folder "
                         f"(see README: the perception checkpoint), or tiny for a random tiny model")
    rt = setup_runtime(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = cfg.model
    for stage in config.STAGES if cfg.stage == "all" else [cfg.stage]:
        if stage == "data":
            stage_data(cfg, rt)
        elif stage == "pretrain":
            path = stage_pretrain(cfg, rt, path or base_model(cfg))
        elif stage == "sft":
            start = stage_model(cfg, "pretrain") if cfg.pretrain_steps > 0 else base_model(cfg)
            path = stage_sft(cfg, rt, path or start)
        elif stage == "selector":
            stage_selector(cfg, rt, path or stage_model(cfg, "sft"))
        elif stage == "rl":
            path = stage_rl(cfg, rt, path or stage_model(cfg, "sft"))
        else:
            stage_eval(cfg, rt, path or stage_model(cfg, "rl"))


if __name__ == "__main__":
    main(sys.argv[1:])
