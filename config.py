"""The one config: every knob of a run, its parser, its --help, and the process a run lives in.

    python train.py --help            # every field below, with its comment and default
    python train.py --coach=fixed:darken --alpha=0.1 --rl_steps=100

Owns: `Config` (one dataclass; a short comment on every field is its documentation, printed by
--help), `parse_args` (`--field=value`, checked against the field's type, every choice-valued field
checked against its allowed values before any stage runs), the settings other files take as small
parameter objects, built here from the Config and nowhere else (frames for data.py, visual-prompt
drawing for prompt.py, reward rules for rewards.py), and `setup_runtime` (accelerate: device,
dtype, rank). train.py re-exports Config, so `train.Config` is this class. Leaves what each knob does
to the file its comment names.

Test: python -m pytest tests/test_train.py -q -k "config or overrides or help"
"""
import dataclasses
import importlib.util
import inspect
import os
import re
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import data
import distill
import grpo
import prompt
import rewards

_VP = prompt.VisualPromptConfig()   # the drawing defaults live in prompt.py; the fields below read them


@dataclass
class Config:
    # ---- run ----
    stage: str = "all"            # all | data | pretrain | sft | selector | rl | eval (all: every stage in that order)
    out_dir: str = "runs/default"  # checkpoints, metrics.jsonl, eval tables
    data_dir: str = "data/synth"  # synthetic data is generated here when missing
    train_json: str = ""          # STGR JSON; empty -> {data_dir}/train.json
    data_root: str = ""           # media root, or one per record `source` (a=/x,b=/y); empty -> the JSON's folder
    max_bad_samples: int = 20     # samples whose media fail mid-run are skipped and counted; one more stops the run
    model: str = ""               # checkpoint dir to start from; empty -> the previous stage's output
    base_model: str = "checkpoints/perception"  # a fresh run's start: a model folder (the committed perception model) | tiny (random)
    seed: int = 0                 # seeds data order, rollouts, the synthetic set and the selector
    device: str = "auto"          # auto | cpu | cuda | cuda:1 ...
    dtype: str = "auto"           # compute: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16 (weights trained stay fp32)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs the flash-attn package and a GPU)
    gradient_checkpointing: bool = False  # recompute the policy's activations in backward (less memory, more compute)
    # ---- frames: what the model is shown (data.py samples them, model.py resizes them) ----
    fps: float = data.FrameConfig.fps  # frames per second sampled from a video
    min_frames: int = data.FrameConfig.min_frames  # a short video still shows this many frames
    max_frames: int = data.FrameConfig.max_frames  # a long video shows at most this many, spread over it
    max_pixels: int = 0           # per-frame pixel budget; 0 -> the checkpoint's preprocessor_config
    # ---- synthetic data (stage data, synth.py) ----
    n_train: int = 1600           # training records (one clip each; the main job fits 15 minutes here)
    n_val: int = 200              # validation records
    n_test: int = 200             # test records (plus one V-STAR annotation per test clip)
    difficulty: float = 0.5       # 0..1: probability that a synthetic sample is generated hard
    synth_workers: int = 2        # processes writing the synthetic set (the output does not depend on it)
    background: str = "gradient"  # synthetic frames: gradient (colour says where; the perception model's frames) | flat grey
    mcq_options: str = "fixed"    # synthetic MCQ options: fixed (one order per answer kind: the word says the letter) | drawn (shuffled: a text lookup; sets before session 28)
    # ---- perception pretraining (stage pretrain, before SFT: probe.py's frame and clip tasks) ----
    pretrain_steps: int = 0       # optimizer steps on frames and clips rendered in memory (--pretrain_tasks); 0 skips the stage
    pretrain_batch: int = 32      # frames per pretraining step, over all ranks
    pretrain_lr: float = 2e-3     # its peak learning rate (sft_warmup steps of warmup, cosine to 10%)
    pretrain_tasks: str = "find:1,marked:1,list:0"  # task:weight mix (probe.py: find, marked, list on frames; at, when, qa, letter on clips)
    pretrain_distractors: int = 4  # most distractors per frame (uniform from 0), grown from 1 over the first half
    pretrain_when_events: str = "stop,turn,colour,appear,meet"  # the when task's events (synth.EVENTS; probe's clip models: appear)
    pretrain_qa_events: str = "stop,turn,colour,appear,meet"  # the qa task's events (probe's qa model: colour)
    pretrain_when_answer: str = "span"  # the when task's target: span (From..to) | trace (the TG trace; probe --when_answer)
    pretrain_qa_answer: str = "answer"  # the qa task's target: answer (the block alone) | trace (the free-form record's; probe --qa_answer)
    # ---- optimizer (SFT and RL) ----
    weight_decay: float = 0.01    # AdamW weight decay on matrices (biases and norms get none)
    adam_beta1: float = 0.9       # AdamW first-moment decay
    adam_beta2: float = 0.95      # AdamW second-moment decay
    grad_clip: float = 1.0        # max global gradient norm
    train_vision: bool = True     # False freezes the vision tower (the usual choice at 7B)
    # ---- SFT (train.py) ----
    sft_epochs: float = 1.0       # passes over the training records
    batch_size: int = 8           # samples (SFT) or prompts (RL) per optimizer step, over all ranks
    grad_accum: int = 1           # SFT micro-batches per step (RL runs one backward per logprob_batch groups)
    sft_forward_batch: int = 4    # SFT samples per forward: a micro-batch sorted by length, in pieces this big (less padding); 0: whole
    lr: float = 2e-3              # SFT peak learning rate (linear warmup, cosine to 10%)
    sft_warmup: int = 20          # SFT warmup steps
    sft_vstar: str = ""           # V-STAR-layout JSON whose chains join SFT; empty: synth's vstar_train.json
    sft_vstar_turns: int = 400    # chain turns added to SFT (5 per clip, drawn once with the seed); 0: none
    sft_vp_share: float = 0.25    # share of SFT records shown with a visual prompt on key frames + hint (at 0, prompted rollouts broke)
    sft_perception: float = 0.0   # perception frames (--pretrain_tasks) added to each SFT micro-batch, per record in it
    sft_perception_weight: float = 0.0  # > 0: their NLL per their own token, times this, beside the records'; 0: one token mean
    sft_attend_weight: float = 0.0  # > 0: claim pointer aid, head 0 of sft_attend_layer looks from a claim at its box in its frame (needs eager attention)
    sft_attend_layer: int = 3     # 1..the model's decoder layers
    # ---- RL (train.py runs the loop, grpo.py the math) ----
    rl_steps: int = 40            # optimizer steps (each: batch_size prompts x group_size rollouts)
    rl_lr: float = 5e-5           # RL peak learning rate (linear warmup, cosine to 10%)
    rl_warmup_share: float = 0.05  # RL warmup as a share of rl_steps (at least one step)
    group_size: int = 4           # G rollouts per prompt
    max_new_tokens: int = 128     # longest completion sampled in RL and for selector labels (96 cut 14% of rollouts: synth traces run to 109)
    temperature: float = 1.0      # sampling temperature of rollouts
    top_p: float = 0.95           # nucleus sampling mass of rollouts
    beta: float = 0.04            # weight of the k3 KL to the frozen reference (0: no reference kept)
    clip_eps: float = 0.2         # the ratio is clipped to 1 +- clip_eps
    adv_std: bool = True          # advantages divided by the group's reward std (GRPO); false: mean-centred only (Dr. GRPO)
    ratio: str = "sequence"       # sequence (GSPO) | token (GRPO)
    inner_updates: int = 1        # optimizer updates per batch of rollouts
    shared_prefix: bool = True    # prompt once per group (False: the plain repeated computation)
    batch_prompts: int = 8        # prompts decoded together (rollouts, coach, selector labels); 1: one at a time
    logprob_batch: int = 1        # groups per log-prob forward (policy, reference, distillation); more: more memory
    max_prompt_tokens: int = 4096  # a longer prompt (frames + text) is skipped and counted
    max_bad_updates: int = 5      # stop after this many updates in a row with NaN/inf loss or gradients
    reward_identity: str = "soft"  # object-name matching in the spatial reward: soft | strict | none
    reward_rules: str = "ours"    # ours | released: rewards.py's rules or the release's (an ablation arm)
    # ---- VisionCoach (distill.py) ----
    coach: str = "selector"       # selector | random | fixed:<visual prompt> | none (plain GRPO/GSPO)
    hard_k: float = 1.9           # a group is hard when its mean total reward < hard_k (1.9: half the val groups here; paper 2.21)
    alpha: float = 0.1            # self-distillation weight (0 turns it off; prompted rollouts still run)
    top_n: int = 2                # prompted rollouts distilled per hard group, best answer reward first
    sd_condition: str = "prompted"  # what the distilled completions are conditioned on: prompted (paper) | raw
    # ---- visual prompts (prompt.py): how strongly each type marks the key objects ----
    vp_darken_factor: float = _VP.darken_factor  # darken: brightness kept outside the boxes (0 black, 1 raw)
    vp_darken_pad: float = _VP.darken_pad  # darken: margin around each box, normalized units
    vp_circle_thickness: int = _VP.circle_thickness  # red_circle: ring width in pixels
    vp_digit_scale: int = 0       # frame_numbers: pixels per font pixel; 0 -> about 1/50 of the short side
    vp_spotlight_dim: float = _VP.spotlight_dim  # spotlight: brightness far from every box
    vp_spotlight_falloff: float = _VP.spotlight_falloff  # spotlight: Gaussian edge sigma, normalized units
    hint_position: str = "before"  # the prompt's hint before the question (the tiny model reads the question last) | after (paper: q + hint)
    # ---- VP-Selector (selector.py) ----
    selector_dir: str = ""        # where predictions.json lives; empty -> {out_dir}/selector
    selector_samples: int = 64    # samples labelled by the proxy (every visual prompt x selector_group answers)
    selector_group: int = 2       # answers per visual prompt when labelling
    selector_hidden: int = 64     # hidden width of the selector's MLP head
    selector_steps: int = 300     # full-batch AdamW steps training the head
    selector_lr: float = 3e-3     # learning rate of the head
    selector_train_share: float = 0.8  # labelled samples the head trains on; the rest measure it
    selector_predict: str = "rl"  # predictions cached for: rl (the ids RL draws in rl_steps) | all (every training id)
    # ---- evaluation (eval.py, and the main job's last stage) ----
    eval_data: str = ""           # eval.py: STGR, V-STAR, VideoMME- or Charades-STA-style JSON (eval.py --data)
    benchmark: str = "auto"       # eval.py: auto | stgr | vstar | mcq | tg, what eval_data holds (eval.py --kind)
    eval_out: str = ""            # eval.py: output folder; empty -> {out_dir}/eval, not the checkpoint (eval.py --out)
    eval_samples: int = 100       # evaluate the first N samples of each file (0: all; eval.py --limit, default 0)
    eval_max_new_tokens: int = 128  # longest answer at evaluation (eval.py --max_new_tokens)
    eval_batch: int = 32          # samples decoded together at evaluation (greedy, one row each); 1: one at a time
    eval_temperature: float = 0.0  # 0 is greedy (eval.py --temperature)
    eval_forced_boxes: bool = True  # STGR: also read the gold traces' boxes and names teacher-forced (forced_box/*, forced_name/*; one forward a record)
    eval_pointer_layer: int = 0   # STGR: head 0's teacher-forced attention in this layer from each gold claim on its box and frame (forced_pointer/*; eager); 0: off
    eval_max_prompt_tokens: int = 16384  # a longer prompt is an error naming the sample (eval.py --max_prompt_tokens)
    # ---- logging / checkpoints ----
    sample_every: int = 20        # RL: write one group's rollouts to samples.jsonl every N steps
    save_every: int = 100         # checkpoint every N optimizer steps (and at the end): {out_dir}/{stage}/checkpoint-N
    keep_checkpoints: int = 2     # newest checkpoints kept per stage (the newest always; 0: keep all)
    resume: bool = True           # continue from the stage's newest complete checkpoint when there is one
    report_to: str = "none"       # none | tensorboard | wandb: also log metrics there (accelerate's trackers)


STAGES = ("data", "pretrain", "sft", "selector", "rl", "eval")
CHOICES = {
    "stage": ("all",) + STAGES,
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "background": ("flat", "gradient"),
    "mcq_options": ("fixed", "drawn"),
    "pretrain_when_answer": ("span", "trace"),
    "pretrain_qa_answer": ("answer", "trace"),
    "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "ratio": grpo.RATIOS,
    "coach": distill.COACH_MODES,
    "selector_predict": ("rl", "all"),
    "sd_condition": distill.SD_CONDITIONS,
    "hint_position": prompt.HINT_POSITIONS,
    "reward_rules": rewards.REWARD_RULES,
    "benchmark": ("auto", "stgr", "vstar", "mcq", "tg"),
    "report_to": ("none", "tensorboard", "wandb"),
}


def field_help():
    """{field name: its comment}, read from the source of Config above (the one place they live)."""
    comments, last = {}, None
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+): [\w|. ]+ = .*?\s#\s(.*)$", line)
        if m:
            last = m.group(1)
            comments[last] = m.group(2).strip()
        elif not line.strip().startswith("#"):
            last = None
    return comments


def help_text(prog, aliases=None, base=None):
    """--help: every field with its default (base's, when given) and comment, grouped as in Config."""
    comments, base = field_help(), base or Config()
    lines = [f"usage: python {prog} [--field=value ...]"]
    for line in inspect.getsource(Config).splitlines()[1:]:
        section = re.match(r"\s+# ---- (.*) ----", line)
        m = re.match(r"\s+(\w+): ", line)
        if section:
            lines.append(f"\n{section.group(1)}:")
        elif m and m.group(1) in comments:
            name = m.group(1)
            default = getattr(base, name)
            flag = f"--{name}={str(default).lower() if isinstance(default, bool) else default}"
            lines.append(f"  {flag:<32} {comments[name]}")
    if aliases:
        lines.append(f"\n{prog} also reads: " + ", ".join(f"--{a} (= --{f})" for a, f in aliases.items()))
    return "\n".join(lines)


def parse_args(argv, cfg=None, aliases=None, prog="train.py"):
    """`--field=value` overrides, each checked against the field's type; choices checked here, so a
    bad value stops the run before any stage starts. `aliases` maps other flag names to fields."""
    cfg = dataclasses.replace(cfg) if cfg is not None else Config()
    aliases = aliases or {}
    fields = {f.name for f in dataclasses.fields(Config)}
    for arg in argv:
        if arg in ("--help", "-h"):
            print(help_text(prog, aliases, cfg))
            sys.exit(0)
        key, eq, value = arg.lstrip("-").partition("=")
        key = key.replace("-", "_")
        key = aliases.get(key, key)
        if not arg.startswith("--") or not eq or key not in fields:
            raise SystemExit(f"bad argument {arg!r}: expected --field=value with field one of {sorted(fields)} "
                             f"(python {prog} --help lists them)")
        setattr(cfg, key, parse_value(key, value, type(getattr(cfg, key))))
    check(cfg)
    return cfg


def parse_value(key, value, field_type):
    if field_type is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--{key} expects true/false, got {value!r}")
        return value.lower() in ("true", "1")
    try:
        return field_type(value)
    except ValueError:
        raise SystemExit(f"--{key} expects {field_type.__name__}, got {value!r}") from None


def check(cfg):
    """Every choice-valued field against its allowed values, and the ranges that would fail late."""
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key}={getattr(cfg, key)!r}: expected one of {', '.join(allowed)}")
    try:
        reward_config(cfg)                   # rewards.RewardConfig checks its own modes
    except ValueError as e:
        raise SystemExit(f"--reward_identity={cfg.reward_identity!r}: {e}") from None
    try:
        frames(cfg)                          # the frame settings are within data.py's limits
    except ValueError as e:
        raise SystemExit(f"frame settings: {e}") from None
    if not 0.0 <= cfg.difficulty <= 1.0:
        raise SystemExit(f"--difficulty must be in [0, 1], got {cfg.difficulty}")
    for key in ("batch_prompts", "logprob_batch", "eval_batch"):
        if getattr(cfg, key) < 1:
            raise SystemExit(f"--{key} must be at least 1 (1: one at a time), got {getattr(cfg, key)}")
    if not 0.0 < cfg.selector_train_share <= 1.0:
        raise SystemExit(f"--selector_train_share must be in (0, 1], got {cfg.selector_train_share}")
    if cfg.sft_attend_weight > 0 and cfg.attn_implementation != "eager":
        raise SystemExit(f"--sft_attend_weight={cfg.sft_attend_weight} reads attention weights, which only "
                         f"--attn_implementation=eager returns (got {cfg.attn_implementation})")
    if cfg.eval_pointer_layer > 0 and cfg.attn_implementation != "eager":
        raise SystemExit(f"--eval_pointer_layer={cfg.eval_pointer_layer} reads attention weights, which only "
                         f"--attn_implementation=eager returns (got {cfg.attn_implementation})")
    if cfg.sft_attend_layer < 1:
        raise SystemExit(f"--sft_attend_layer is 1-based, got {cfg.sft_attend_layer}")
    if cfg.keep_checkpoints < 0 or cfg.save_every < 1:
        raise SystemExit(f"--keep_checkpoints must be >= 0 and --save_every >= 1, got {cfg.keep_checkpoints} "
                         f"and {cfg.save_every}")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise SystemExit(f"--report_to={cfg.report_to} needs the {cfg.report_to} package, which is not installed "
                         f"(pip install {cfg.report_to}), or use --report_to=none")


# ---------------------------------------------------------------------------------------------
# Settings other files take, derived from the Config (one place each)
# ---------------------------------------------------------------------------------------------

def frames(cfg):
    """How videos are sampled into frames (data.load_video_sample)."""
    return data.FrameConfig(cfg.fps, cfg.min_frames, cfg.max_frames, cfg.max_pixels or data.MAX_FRAME_PIXELS)


def vp_config(cfg):
    """How the visual prompts are drawn (prompt.apply_visual_prompt)."""
    return prompt.VisualPromptConfig(darken_factor=cfg.vp_darken_factor, darken_pad=cfg.vp_darken_pad,
                                     circle_thickness=cfg.vp_circle_thickness,
                                     digit_scale=cfg.vp_digit_scale or None, spotlight_dim=cfg.vp_spotlight_dim,
                                     spotlight_falloff=cfg.vp_spotlight_falloff)


def reward_config(cfg):
    """The reward rules (rewards.score_group): ours or the release's, with cfg's name matching."""
    return rewards.rules_config(cfg.reward_rules, cfg.reward_identity)


def sampling(cfg, n=None):
    """How rollouts are sampled (grpo.rollout): n completions per prompt, group_size by default."""
    return grpo.Sampling(n or cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p)


def rl_warmup(cfg):
    return max(1, int(cfg.rl_steps * cfg.rl_warmup_share))


# ---------------------------------------------------------------------------------------------
# The process a run lives in
# ---------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    accelerator: object
    device: torch.device
    dtype: torch.dtype            # compute dtype; frozen models are loaded in it, trainable ones in fp32
    rank: int
    world: int

    @property
    def main(self):
        return self.rank == 0

    def gather(self, obj):
        """[obj of every rank], in rank order. torch.distributed's, which knows the world even where
        accelerate counts one process (DeepSpeed on its CPU accelerator)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def autocast(self):
        """Matmuls in the compute dtype over fp32 master weights: a bf16 parameter stepped by AdamW at
        lr 1e-6 would drop almost every update below its resolution (REFERENCE.md section 8)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def setup_runtime(cfg):
    """torchrun / accelerate launch, or one plain process. Seeds torch per rank."""
    from accelerate import Accelerator   # heavy; only entry points that run a model need it
    # cpu=True also makes torchrun on CPUs a gloo process group; it would switch off a DeepSpeed launch
    # config, though, which runs on DeepSpeed's CPU accelerator as well
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available() and not deepspeed)
    acc = Accelerator(cpu=cpu, log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=cfg.out_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
    if dtype is None:
        dtype = torch.float32 if acc.device.type == "cpu" else torch.bfloat16
    if acc.state.deepspeed_plugin is not None:
        configure_deepspeed(acc.state.deepspeed_plugin.deepspeed_config, cfg)
    rank, world = acc.process_index, acc.num_processes
    if torch.distributed.is_initialized():
        # DeepSpeed on its CPU accelerator starts the process group itself and accelerate then counts
        # one process; torch.distributed knows the real rank and world (on GPUs the two agree)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    return Runtime(acc, acc.device, dtype, rank, world)


def configure_deepspeed(ds, cfg):
    """What accelerate cannot infer for DeepSpeed when no DataLoader is prepared. Our loops run their own
    micro-batches (one backward per sample or group) and step once per optimizer step, so DeepSpeed
    sees micro batch 1 and no accumulation of its own; it clips gradients itself, at --grad_clip."""
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.grad_clip
    ds.pop("train_batch_size", None)     # "auto" would be recomputed from the two above


def log(rt, *args):
    """Rank 0 alone prints."""
    if rt.main:
        print(*args, flush=True)
