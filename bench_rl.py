"""Benchmark (a script, not a test): one RL step with the shared video prefix vs the plain repeated way.

    python bench_rl.py                                   # 16 frames 224x224, G=8, 64-token completions
    python bench_rl.py --repeats=2 --device=cuda         # bf16 on a GPU
    python bench_rl.py --prompts=8 --repeats=2           # a whole step over P=8 prompts x G (see below)
    python bench_rl.py --eval_prompts=16                 # eval-style greedy decoding, batched vs one by one
    python bench_rl.py --ckpt=runs/default/sft/last --data_dir=data/synth   # the main job's RL step and eval

Builds a random tiny Qwen2.5-VL (model.build_tiny_model, sized by --layers / --hidden) in a temp
dir and one long prompt: --frames noise frames of --size x --size pixels (16 x 224x224 -> 1,024
visual tokens). Then, for each path, in a fresh subprocess (so peak memory is the path's own):
  1. fwd+bwd: reference log-probs (no grad, a second copy of the model), policy log-probs with
     grad, k3 KL and the GSPO loss (grpo.policy_loss), backward. Same completions for both paths.
  2. step: generate G completions of exactly --completion tokens (no stop ids), then the same
     fwd+bwd and an AdamW step.
"shared" is model.generate / model.shared_prefix_logprobs (prompt run once per group, its KV cache
expanded to G rows). "plain" is what most RL code does: the prompt repeated G times as a batch, in
generation (plain_generate below) and in both forwards (model.plain_logprobs).

Prints the median of --repeats timings (after one warm-up), their ratios, peak memory (ru_maxrss on
CPU, torch.cuda.max_memory_allocated on GPU) and each path's loss, and whether the targets of
issue 3 are met: fwd+bwd >= 5x and step >= 3x faster, lower peak memory, identical loss.
The policy is the reference plus small weight noise so the KL term (hence the loss) depends on
the log-probs; advantages are group-normalized random rewards (mean zero).

--prompts=P (> 1): P prompts (questions of different lengths, each its own noise frames), G
completions each, and a whole RL step timed in parts: generation, reference log-probs, policy
forward+backward, optimizer. Three paths, each in its own process (peak memory is the path's own):
"batched" (model.generate_groups with batch_prompts=P, model.groups_logprobs with --logprob_batch
groups per forward, backward per chunk), "one" (today's loop: one prompt at a time, shared prefix),
"plain" (one prompt at a time, each prompt repeated G times). Per-prompt generators, no stop ids.
Prints median seconds of each part, CPU seconds of the step (steadier than wall time on a shared
machine), completion tokens per second, peak memory, and the loss of all paths on the same fixed
completions (they must agree).

--eval_prompts=N: N synthetic STGR test prompts (synth.py, default frame settings) and the default
tiny model (or --model, any checkpoint), greedy decoding of up to --max_new tokens, model.generate_groups
with batch_prompts=1 and =N alternately in one process; samples per second and whether both give
the same tokens.

--ckpt=DIR (a checkpoint, e.g. runs/default/sft/last; --data_dir the main job's data): the main
job's own RL step (train.rl_rollouts + train.rl_update, the default config but --coach) with
--batch_prompts=1 --logprob_batch=1 and with the defaults, as two runs from the same checkpoint,
alternating step by step in one process; then eval.evaluate on --eval_n STGR and V-STAR test
samples with each --eval_batches value, alternating. Prints each part of the step (inputs,
generation, coach, update), CPU seconds, samples per second, and whether the arms agree.
"""
import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers

import config
import data
import eval
import grpo
import model
import synth
import train

CORPUS = [data.SYSTEM_PROMPT, "Frame 1 at 0.0s: The video is in total 8.0 seconds.",
          "<think>The <obj>red ball</obj><box>[10,20,60,90]</box>at<t>2.5</t>s rolls left.</think>",
          "<answer>The ball moves to the left of the box.</answer>"] * 20
QUESTION = "Where does the ball go after it hits the wall?"
QUESTIONS = [QUESTION, "What colour is the box?", "When does the red ball first touch the left wall of the room?",
             "Which object moves faster?", "Where is the ball at the end of the video, and what is next to it?",
             "How many times does the ball bounce?", "What happens after the ball stops rolling at the wall?",
             "Is the box left of the ball?"]
MULTI_PATHS = ("batched", "one", "plain")    # multi-prompt mode's paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=16, help="frames in the prompt")
    p.add_argument("--size", type=int, default=224, help="frame height and width in pixels")
    p.add_argument("--completion", type=int, default=64, help="tokens per completion (forced, no stop)")
    p.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    p.add_argument("--layers", type=int, default=4, help="text layers of the tiny model")
    p.add_argument("--hidden", type=int, default=256, help="text width (head_dim 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    p.add_argument("--prompts", type=int, default=1, help="P > 1: a whole step over P prompts, three paths")
    p.add_argument("--logprob_batch", type=int, default=0, help="groups per forward on the batched path (0: all P)")
    p.add_argument("--paths", default=",".join(MULTI_PATHS), help="multi-prompt mode: which paths to run")
    p.add_argument("--eval_prompts", type=int, default=0, help="N > 0: eval-style greedy decoding of N STGR prompts")
    p.add_argument("--max_new", type=int, default=128, help="eval mode: max new tokens (eval.py's default)")
    p.add_argument("--model", default="", help="eval mode: a checkpoint directory (default: random tiny model)")
    p.add_argument("--ckpt", default="", help="a checkpoint: time the main job's RL step and eval with it, batched vs one")
    p.add_argument("--data_dir", default="data/synth", help="--ckpt mode: the main job's data folder")
    p.add_argument("--coach", default="random", help="--ckpt mode: the RL step's --coach (selector needs --selector_dir)")
    p.add_argument("--selector_dir", default="", help="--ckpt mode: where the selector's predictions.json is")
    p.add_argument("--steps", type=int, default=3, help="--ckpt mode: RL steps per arm (the first is a warm-up)")
    p.add_argument("--eval_n", type=int, default=24, help="--ckpt mode: STGR and V-STAR test samples evaluated (0: no eval)")
    p.add_argument("--eval_batches", default="1,32", help="--ckpt mode: --eval_batch values for eval")
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)     # set in the child processes
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The baseline: generation the usual way (prompt repeated G times, no shared cache)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def plain_generate(vlm, prompt, num_samples, max_new_tokens, banned_ids, generator=None):
    """Prefill the prompt as G separate rows of a batch (vision tower and all), then decode G x C."""
    Gn = num_samples
    ids = prompt.input_ids[None].expand(Gn, -1)                              # (G, P)
    types = prompt.mm_token_type_ids[None].expand(Gn, -1)                    # (G, P)
    grid = prompt.image_grid_thw.repeat(Gn, 1)                               # (G * frames, 3)
    position_ids, _ = vlm.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)
    out = vlm.model(input_ids=ids, position_ids=position_ids, pixel_values=prompt.pixel_values.repeat(Gn, 1),
                      image_grid_thw=grid, mm_token_type_ids=types, use_cache=True)
    cache, start = out.past_key_values, int(position_ids.max()) + 1
    logits = vlm.lm_head(out.last_hidden_state[:, -1])                     # (G, V)
    banned = torch.tensor(banned_ids, dtype=torch.long, device=logits.device)
    tokens = []
    for step in range(max_new_tokens):
        nxt = model.sample_next(logits.index_fill(-1, banned, float("-inf")), generator=generator)  # (G,)
        tokens.append(nxt)
        pos = model._text_positions(start + step, Gn, 1, nxt.device)
        h = vlm.model.language_model(input_ids=nxt[:, None], position_ids=pos, cache=cache,
                                       use_cache=True).last_hidden_state
        logits = vlm.lm_head(h[:, -1])
    return torch.stack(tokens, dim=1)                                        # (G, C)


def logprobs(vlm, prompt, ids, path):
    """(G, C) log-probs of the completions `ids` under `model`, by either path."""
    if path == "shared":
        return model.shared_prefix_logprobs(vlm, prompt, ids)
    return torch.stack(model.plain_logprobs(vlm, [prompt] * len(ids), list(ids)))


def rl_loss(policy, ref, prompt, ids, adv, path):
    """The full RL loss of one group: ref log-probs (no grad), policy log-probs, k3 KL, GSPO."""
    with torch.no_grad():
        ref_logp = logprobs(ref, prompt, ids, path)
    logp = logprobs(policy, prompt, ids, path)
    mask = torch.ones_like(ids, dtype=torch.bool)
    loss, _ = grpo.policy_loss(logp, logp.detach(), ref_logp, adv, mask, ratio="sequence")
    return loss


# ---------------------------------------------------------------------------------------------
# One path, in its own process
# ---------------------------------------------------------------------------------------------

def timed(fn, repeats, device):
    """Median seconds of `repeats` calls of fn after one warm-up; returns (median, last result)."""
    times, result = [], fn()
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def load_pair(args):
    """(policy, frozen reference, tokenizer, dtype) from args.workdir; the policy is the reference
    moved a little, so the KL term depends on the log-probs."""
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    policy, tokenizer, _ = model.load_policy(args.workdir, args.device, dtype)
    ref, _, _ = model.load_policy(args.workdir, args.device, dtype)
    ref.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return policy, ref, tokenizer, dtype


def peak_mib(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def run_path(args):
    """Time fwd+bwd and a whole step for args.path; print one JSON line with the results."""
    policy, ref, tokenizer, dtype = load_pair(args)
    saved = load_bench(args.workdir)
    prompt = saved["prompt"].to(args.device, dtype)
    ids, adv = saved["ids"].to(args.device), saved["adv"].to(args.device)
    banned = model.vision_token_ids(tokenizer)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    gen = torch.Generator(args.device).manual_seed(2)

    def fwd_bwd(completions):
        loss = rl_loss(policy, ref, prompt, completions, adv, args.path)
        loss.backward()
        return loss.item()

    def fwd_bwd_fixed():
        policy.zero_grad(set_to_none=True)
        return fwd_bwd(ids)

    def step():
        if args.path == "shared":   # stop_ids=[]: every completion runs the full length
            new, _, _ = model.generate(policy, prompt, args.group, args.completion, [], tokenizer.pad_token_id,
                                   generator=gen, banned_ids=banned)
        else:
            new = plain_generate(policy, prompt, args.group, args.completion, banned, gen)
        assert new.shape == (args.group, args.completion), new.shape
        opt.zero_grad(set_to_none=True)
        fwd_bwd(new)
        opt.step()

    fb_s, loss = timed(fwd_bwd_fixed, args.repeats, args.device)   # before any optimizer step
    step_s, _ = timed(step, args.repeats, args.device)
    print(json.dumps({"path": args.path, "fb_s": fb_s, "step_s": step_s, "peak_mib": peak_mib(args.device),
                      "loss": loss}))


# ---------------------------------------------------------------------------------------------
# The parent: build the model and prompt, run both paths, print the table
# ---------------------------------------------------------------------------------------------

def build_model(args, workdir):
    """The random tiny model the benchmark runs, saved to workdir. -> (model, tokenizer, vision)"""
    torch.set_num_threads(args.threads)
    cfg = model.TinyModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 32,
                            num_kv_heads=2, intermediate_size=2 * args.hidden, frame_pixels=args.size * args.size)
    vlm, tokenizer = model.build_tiny_model(workdir, CORPUS, cfg, seed=0)
    return vlm, tokenizer, model.VisionProcessor.load(workdir)


def noise_prompt(args, tokenizer, vision, question, seed):
    """--frames noise frames of --size pixels, half a second apart, and the question."""
    times = [round(0.5 * i, 1) for i in range(args.frames)]
    frames = torch.randint(0, 256, (args.frames, 3, args.size, args.size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    return model.tokenize_prompt(tokenizer, data.render_prompt(question, times, 0.5 * args.frames), frames, vision)


def prepare(args, workdir):
    """Tiny model + one long prompt + fixed completions and advantages, saved to workdir."""
    vlm, tokenizer, vision = build_model(args, workdir)
    prompt = noise_prompt(args, tokenizer, vision, QUESTION, 0)
    ids, _, _ = model.generate(vlm, prompt, args.group, args.completion, [], tokenizer.pad_token_id,
                           generator=torch.Generator().manual_seed(0), banned_ids=model.vision_token_ids(tokenizer))
    rewards = torch.rand(args.group, generator=torch.Generator().manual_seed(0))
    torch.save({"prompt": prompt, "ids": ids, "adv": grpo.group_advantages(rewards)}, os.path.join(workdir, "bench.pt"))
    return len(prompt), int(prompt.mm_token_type_ids.sum())


def loss_tolerance(device, loss):
    """How far two paths' losses may differ: float summation order on CPU (fp32); on a GPU (bf16)
    5% of the loss, which is small here (mostly the KL term), so an absolute bound would pass a
    path that scores completions without their prompt (seen: 15% off, under transformers 5.17)."""
    return 1e-5 if device == "cpu" else 0.05 * abs(loss)


def run_child(path, workdir):
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--path={path}", f"--workdir={workdir}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{path} path failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdict(ok):
    return "met" if ok else "MISSED"


def main_single(args):
    with tempfile.TemporaryDirectory() as workdir:
        P, visual = prepare(args, workdir)
        print(f"prompt: {P} tokens ({visual} visual, {args.frames} frames of {args.size}x{args.size}); "
              f"G = {args.group}, completions of {args.completion} tokens; {args.layers} layers x {args.hidden} wide; "
              f"device {args.device}, {args.threads} threads, median of {args.repeats} after 1 warm-up")
        res = {path: run_child(path, workdir) for path in ("shared", "plain")}
    print("\n| path | fwd+bwd s | step s | peak MiB | loss |\n|---|---|---|---|---|")
    for r in res.values():
        print(f"| {r['path']} | {r['fb_s']:.2f} | {r['step_s']:.2f} | {r['peak_mib']:.0f} | {r['loss']:.9g} |")
    s, p = res["shared"], res["plain"]
    fb, st, mem = p["fb_s"] / s["fb_s"], p["step_s"] / s["step_s"], s["peak_mib"] / p["peak_mib"]
    diff, tol = abs(s["loss"] - p["loss"]), loss_tolerance(args.device, p["loss"])
    print(f"\nfwd+bwd speed-up {fb:.1f}x (target >= 5x: {verdict(fb >= 5)})")
    print(f"step speed-up    {st:.1f}x (target >= 3x: {verdict(st >= 3)})")
    print(f"peak memory      shared / plain = {mem:.2f} (target < 1: {verdict(mem < 1)})")
    print(f"loss |diff|      {diff:.2e} (target <= {tol:g}: {verdict(diff <= tol)})")


# ---------------------------------------------------------------------------------------------
# Multi-prompt mode: a whole RL step over P prompts x G, batched / one prompt at a time / plain
# ---------------------------------------------------------------------------------------------

PARTS = ("generate", "reference", "policy_fwd_bwd", "optimizer")


def prepare_multi(args, workdir):
    """Tiny model, P prompts (own frames, questions of different lengths), fixed random completions
    and advantages (for the cross-path loss check), saved to workdir. -> prompt lengths."""
    vlm, tokenizer, vision = build_model(args, workdir)
    prompts = [noise_prompt(args, tokenizer, vision, QUESTIONS[i % len(QUESTIONS)], i) for i in range(args.prompts)]
    normal = torch.tensor(sorted(set(range(len(tokenizer))) - set(model.vision_token_ids(tokenizer))))
    g = torch.Generator().manual_seed(0)
    ids = [normal[torch.randint(0, len(normal), (args.group, args.completion), generator=g)] for _ in prompts]
    adv = [grpo.group_advantages(torch.rand(args.group, generator=g)) for _ in prompts]
    torch.save({"prompts": prompts, "ids": ids, "adv": adv}, os.path.join(workdir, "bench.pt"))
    return [len(p) for p in prompts]


class MultiStep:
    """One path's RL step over all prompts, in parts (generate, reference, policy fwd+bwd, optimizer)."""

    def __init__(self, args, policy, ref, tokenizer, prompts, adv):
        self.args, self.policy, self.ref, self.prompts, self.adv = args, policy, ref, prompts, adv
        self.banned = model.vision_token_ids(tokenizer)
        self.sampling = model.Sampling(args.completion, [], tokenizer.pad_token_id, banned_ids=tuple(self.banned))
        P = len(prompts)
        self.per_forward = (args.logprob_batch or P) if args.path == "batched" else 1
        self.opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    def generate(self, step):
        """Per-prompt generators, seeded from (step, prompt), as the RL step seeds them."""
        a, P = self.args, len(self.prompts)
        gens = [torch.Generator(a.device).manual_seed(1000 * step + i) for i in range(P)]
        if a.path == "plain":
            return [plain_generate(self.policy, p, a.group, a.completion, self.banned, g) for p, g in zip(self.prompts, gens)]
        outs = model.generate_groups(self.policy, self.prompts, a.group, self.sampling, gens,
                                 batch_prompts=P if a.path == "batched" else 1)
        return [ids for ids, _, _ in outs]

    def logprobs(self, vlm, idx, comps):
        """Log-probs of the groups idx (a list of prompt indices), one forward when batched."""
        if self.args.path == "plain":
            return [logprobs(vlm, self.prompts[i], comps[i], "plain") for i in idx]
        return model.groups_logprobs(vlm, [self.prompts[i] for i in idx], [comps[i] for i in idx], self.per_forward)

    def reference(self, comps):
        with torch.no_grad():
            return self.logprobs(self.ref, list(range(len(comps))), comps)

    def policy_backward(self, comps, refs):
        """GSPO + KL over all groups, every group weighing 1 / P; backward once per chunk of groups."""
        total, P = 0.0, len(comps)
        for idx in model.chunks(list(range(P)), self.per_forward):
            logps = self.logprobs(self.policy, idx, comps)
            loss = sum(grpo.policy_loss(lp, lp.detach(), refs[i], self.adv[i], torch.ones_like(comps[i], dtype=torch.bool),
                                     ratio="sequence")[0] for lp, i in zip(logps, idx)) / P
            loss.backward()
            total += loss.item()
        return total

    def step(self, k):
        """A whole step; returns wall seconds of each part and CPU seconds of the whole."""
        sync = torch.cuda.synchronize if self.args.device.startswith("cuda") else (lambda: None)
        times, cpu0 = {}, time.process_time()

        def part(name, fn):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            times[name] = time.perf_counter() - t
            return out

        comps = part("generate", lambda: self.generate(k))
        refs = part("reference", lambda: self.reference(comps))
        self.opt.zero_grad(set_to_none=True)
        part("policy_fwd_bwd", lambda: self.policy_backward(comps, refs))
        part("optimizer", self.opt.step)
        times["step"] = sum(times.values())
        times["cpu"] = time.process_time() - cpu0
        return times


def run_multi_path(args):
    """The cross-path loss on fixed completions, then one warm-up and --repeats timed steps."""
    policy, ref, tokenizer, dtype = load_pair(args)
    saved = load_bench(args.workdir)
    prompts = [p.to(args.device, dtype) for p in saved["prompts"]]
    ids = [i.to(args.device) for i in saved["ids"]]
    adv = [a.to(args.device) for a in saved["adv"]]
    run = MultiStep(args, policy, ref, tokenizer, prompts, adv)
    loss = run.policy_backward(ids, run.reference(ids))      # before any optimizer step
    steps = [run.step(k) for k in range(args.repeats + 1)]
    steps = steps[1:] or steps                                # --repeats=0: one step, no warm-up (memory only)
    med = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    tokens = len(prompts) * args.group * args.completion
    print(json.dumps({"path": args.path, **med, "gen_tok_s": tokens / med["generate"],
                      "step_tok_s": tokens / med["step"], "peak_mib": peak_mib(args.device), "loss": loss}))


def main_multi(args):
    with tempfile.TemporaryDirectory() as workdir:
        lengths = prepare_multi(args, workdir)
        print(f"P = {args.prompts} prompts of {min(lengths)}..{max(lengths)} tokens ({args.frames} frames of "
              f"{args.size}x{args.size}); G = {args.group}, completions of {args.completion} tokens (no stop); "
              f"{args.layers} layers x {args.hidden} wide; logprob_batch {args.logprob_batch or args.prompts}; "
              f"device {args.device}, {args.threads} threads, " +
              (f"median of {args.repeats} steps after 1 warm-up" if args.repeats else "one step, no warm-up"))
        res = {}
        for path in args.paths.split(","):
            res[path] = run_child(path, workdir)
            print(json.dumps(res[path]), flush=True)          # partial results survive a timeout
    print("\n| path | step s | generate s | reference s | policy fwd+bwd s | optimizer s | step CPU s "
          "| gen tok/s | step tok/s | peak MiB | loss |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res.values():
        print(f"| {r['path']} | {r['step']:.2f} | " + " | ".join(f"{r[k]:.2f}" for k in PARTS) +
              f" | {r['cpu']:.1f} | {r['gen_tok_s']:.0f} | {r['step_tok_s']:.0f} | {r['peak_mib']:.0f} | {r['loss']:.9g} |")
    if set(res) != set(MULTI_PATHS):
        return
    b = res["batched"]
    for other in ("one", "plain"):
        o = res[other]
        print(f"\nbatched vs {other}: step {o['step'] / b['step']:.1f}x (CPU {o['cpu'] / b['cpu']:.1f}x), " +
              ", ".join(f"{k} {o[k] / b[k]:.1f}x" for k in PARTS[:3]) + f", peak memory {b['peak_mib'] / o['peak_mib']:.2f}")
    diff = max(abs(b["loss"] - res[k]["loss"]) for k in ("one", "plain"))
    tol = loss_tolerance(args.device, res["plain"]["loss"])
    print(f"step speed-up vs plain {res['plain']['step'] / b['step']:.1f}x "
          f"(issue 14 target >= 5x: {verdict(res['plain']['step'] / b['step'] >= 5)})")
    print(f"loss |diff| {diff:.2e} (target <= {tol:g}: {verdict(diff <= tol)})")


# ---------------------------------------------------------------------------------------------
# Eval mode: greedy decoding of N synthetic STGR prompts, batched vs one by one, in one process
# ---------------------------------------------------------------------------------------------

def eval_prompts(args, workdir):
    """N synthetic STGR test prompts (default frame settings) and the model. -> (model, tokenizer, prompts)"""
    synth.generate(synth.SynthConfig(out=os.path.join(workdir, "synth"), n_train=0, n_val=0,
                                     n_test=args.eval_prompts, seed=0, workers=1))
    records = data.load_records(os.path.join(workdir, "synth", "test.json"))
    if args.model:
        vlm, tokenizer, vision = model.load_policy(args.model, args.device,
                                                 torch.float32 if args.device == "cpu" else torch.bfloat16)
    else:
        frame_text = "".join(p for p in data.render_prompt("", data.sample_times(8.0), 8.0) if isinstance(p, str))
        corpus = [frame_text] * 50 + [r["question"] + " " + r["answer"] for r in records] + CORPUS
        vlm, tokenizer = model.build_tiny_model(os.path.join(workdir, "model"), corpus, seed=0)
        vlm = vlm.to(args.device)
        vision = model.VisionProcessor.load(os.path.join(workdir, "model"))
    prompts = []
    for r in records:
        video = data.load_video_sample(r)
        parts = data.render_prompt(r["question"], video.times, video.duration)
        prompts.append(model.tokenize_prompt(tokenizer, parts, video.frames, vision).to(args.device, vlm.dtype))
    return vlm.eval(), tokenizer, prompts


def main_eval(args):
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        vlm, tokenizer, prompts = eval_prompts(args, workdir)
    N = len(prompts)
    S = model.Sampling(args.max_new, model.stop_token_ids(vlm, tokenizer), tokenizer.pad_token_id, temperature=0.0,
                   banned_ids=tuple(model.vision_token_ids(tokenizer)))
    times, outs = {1: [], N: []}, {}
    for k in range(args.repeats + 1):                  # alternate the two, first round is the warm-up
        for bp in (1, N):
            t = time.perf_counter()
            outs[bp] = model.generate_groups(vlm, prompts, 1, S, batch_prompts=bp)
            if k:
                times[bp].append(time.perf_counter() - t)
    lengths = [int(m.sum()) for _, m, _ in outs[1]]
    same = sum(torch.equal(a[0], b[0]) for a, b in zip(outs[1], outs[N]))
    print(f"{N} STGR prompts of {min(len(p) for p in prompts)}..{max(len(p) for p in prompts)} tokens, greedy, "
          f"up to {args.max_new} new tokens (completions {min(lengths)}..{max(lengths)}); device {args.device}, "
          f"{args.threads} threads, median of {args.repeats} after 1 warm-up")
    one, many = statistics.median(times[1]), statistics.median(times[N])
    print(f"\n| path | s | samples/s |\n|---|---|---|\n| one prompt at a time | {one:.2f} | {N / one:.2f} |\n"
          f"| batched ({N} prompts) | {many:.2f} | {N / many:.2f} |")
    print(f"\nspeed-up {one / many:.1f}x; identical completions: {same} of {N}")


# ---------------------------------------------------------------------------------------------
# Run mode: the main job's RL step and eval, batched vs one prompt at a time, in one process
# ---------------------------------------------------------------------------------------------

RL_PARTS = ("inputs", "generate", "coach", "update")


def rl_arm_step(cfg, rt, run, rl, step):
    """One RL step of the main job (rollouts, coach, update) -> wall seconds of each part, CPU
    seconds, and the step's mean raw reward."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    vlm = train.unwrap(rt, run.policy).model
    vlm.eval()
    groups, sd, _, counts = train.rl_rollouts(cfg, rt, run, rl, step)
    vlm.train()
    t = time.perf_counter()
    train.rl_update(cfg, rt, run, rl.ref, groups, sd, 0, step)
    parts = {k: counts[f"time/{k}"] for k in RL_PARTS[:3]}
    parts.update(update=time.perf_counter() - t, step=time.perf_counter() - t0, cpu=time.process_time() - cpu0)
    rewards = [r for g in groups if g is not None for r in g.rewards["total"]]
    return parts, sum(rewards) / len(rewards), len(sd)


def load_bench(workdir):
    """The prompts and rollouts a bench step reuses, read with weights_only (model.Prompt allowed by
    name): a planted file cannot run code."""
    with torch.serialization.safe_globals([model.Prompt]):
        return torch.load(os.path.join(workdir, "bench.pt"), weights_only=True)


def main_run(args):
    torch.set_num_threads(args.threads)
    sft = args.ckpt
    with tempfile.TemporaryDirectory() as tmp:
        base = train.Config(stage="rl", out_dir=tmp, data_dir=args.data_dir, resume=False, coach=args.coach,
                            selector_dir=args.selector_dir)
        arms = {"one": dataclasses.replace(base, batch_prompts=1, logprob_batch=1), "batched": base}
        rt = train.setup_runtime(base)
        records = train.load_train_records(base)
        ref = model.load_policy(sft, rt.device, rt.dtype)[0].requires_grad_(False).eval()
        rl = train.RL(ref, records, train.make_coach(base, records), config.reward_config(base))
        runs = {arm: train.start_run(cfg, rt, "rl", train.load_policy(cfg, rt, sft), (None, None), cfg.rl_lr, cfg.rl_steps,
                                     config.rl_warmup(cfg)) for arm, cfg in arms.items()}
        res = {arm: [] for arm in arms}
        for step in range(args.steps):
            for arm, cfg in arms.items():
                res[arm].append(rl_arm_step(cfg, rt, runs[arm], rl, step))
                parts, reward, n_sd = res[arm][-1]
                print(f"step {step} {arm}: {json.dumps({k: round(v, 3) for k, v in parts.items()})} "
                      f"reward {reward:.6f}, {n_sd} SD examples", flush=True)
        print(f"\nRL step: batch_size {base.batch_size} x G = {base.group_size}, up to {base.max_new_tokens} new tokens, "
              f"coach {base.coach}; batched: batch_prompts {base.batch_prompts}, logprob_batch {base.logprob_batch}; "
              f"{args.threads} threads; median of steps 1..{args.steps - 1} (step 0 is a warm-up)")
        print("\n| arm | step s | " + " | ".join(f"{k} s" for k in RL_PARTS) + " | step CPU s |\n|---|---|---|---|---|---|---|")
        med = {arm: {k: statistics.median(p[k] for p, _, _ in rows[1:]) for k in rows[0][0]} for arm, rows in res.items()}
        for arm, m in med.items():
            print(f"| {arm} | {m['step']:.2f} | " + " | ".join(f"{m[k]:.2f}" for k in RL_PARTS) + f" | {m['cpu']:.2f} |")
        o, b = med["one"], med["batched"]
        print(f"\nbatched vs one: step {o['step'] / b['step']:.2f}x (CPU {o['cpu'] / b['cpu']:.2f}x), " +
              ", ".join(f"{k} {o[k] / max(b[k], 1e-9):.2f}x" for k in RL_PARTS))
        same = all(abs(x[1] - y[1]) < 1e-6 and x[2] == y[2] for x, y in zip(res["one"], res["batched"]))
        print(f"same rewards and SD examples every step: {same}")
        if args.eval_n:
            main_run_eval(args, base, rt, sft, tmp)


def main_run_eval(args, base, rt, sft, tmp):
    """eval.evaluate on the run's STGR and V-STAR test files with each --eval_batches value, alternating."""
    bundle = model.load_policy(sft, rt.device, rt.dtype)
    bundle[0].eval()
    batches = [int(b) for b in args.eval_batches.split(",")]
    print(f"\neval: {args.eval_n} samples of each file, greedy, up to {base.eval_max_new_tokens} new tokens; "
          f"median of {args.repeats} rounds after 1 warm-up (alternating)")
    print("\n| file | eval_batch | s | samples/s | speed-up | same summary |\n|---|---|---|---|---|---|")
    for name in ("test.json", "vstar_test.json"):
        times, summaries = {b: [] for b in batches}, {}
        for k in range(args.repeats + 1):
            for bp in batches:
                ecfg = dataclasses.replace(base, model=sft, eval_data=os.path.join(args.data_dir, name),
                                           eval_out=os.path.join(tmp, "eval"), eval_samples=args.eval_n,
                                           eval_batch=bp)
                t = time.perf_counter()
                with torch.no_grad():
                    summaries[bp] = eval.evaluate(ecfg, bundle, rt)
                if k:
                    times[bp].append(time.perf_counter() - t)
        one = statistics.median(times[batches[0]])
        for bp in batches:
            s = statistics.median(times[bp])
            print(f"| {name} | {bp} | {s:.2f} | {summaries[bp]['n'] / s:.2f} | {one / s:.2f}x | "
                  f"{summaries[bp] == summaries[batches[0]]} |", flush=True)


def main():
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()
    if args.path:
        return run_multi_path(args) if args.prompts > 1 else run_path(args)
    if args.eval_prompts:
        return main_eval(args)
    if args.ckpt:
        return main_run(args)
    return main_multi(args) if args.prompts > 1 else main_single(args)


if __name__ == "__main__":
    main()
