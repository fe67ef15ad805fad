"""Benchmark (a script, not a test): one RL step with the shared video prefix vs the plain repeated way.

    python bench_rl.py                                   # 16 frames 224x224, G=8, 64-token completions
    python bench_rl.py --repeats=2 --device=cuda         # bf16 on a GPU

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
"""
import argparse
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

import data
import grpo
import model

CORPUS = [data.SYSTEM_PROMPT, "Frame 1 at 0.0s: The video is in total 8.0 seconds.",
          "<think>The <obj>red ball</obj><box>[10,20,60,90]</box>at<t>2.5</t>s rolls left.</think>",
          "<answer>The ball moves to the left of the box.</answer>"] * 20
QUESTION = "Where does the ball go after it hits the wall?"


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
    logits = vlm.lm_head(out.last_hidden_state[:, -1])                       # (G, V)
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
    """(G, C) log-probs of the completions `ids` under `vlm`, by either path."""
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


def run_path(args):
    """Time fwd+bwd and a whole step for args.path; print one JSON line with the results."""
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    policy, tokenizer, _ = model.load_policy(args.workdir, args.device, dtype)
    ref, _, _ = model.load_policy(args.workdir, args.device, dtype)
    ref.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                                # the policy has moved a little from the reference
        for p in policy.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    saved = torch.load(os.path.join(args.workdir, "bench.pt"), weights_only=False)  # our own file
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
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    print(json.dumps({"path": args.path, "fb_s": fb_s, "step_s": step_s, "peak_mib": peak, "loss": loss}))


# ---------------------------------------------------------------------------------------------
# The parent: build the model and prompt, run both paths, print the table
# ---------------------------------------------------------------------------------------------

def prepare(args, workdir):
    """Tiny model + one long prompt + fixed completions and advantages, saved to workdir."""
    torch.set_num_threads(args.threads)
    cfg = model.TinyModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 32,
                                num_kv_heads=2, intermediate_size=2 * args.hidden,
                                frame_pixels=args.size * args.size)
    vlm, tokenizer = model.build_tiny_model(workdir, CORPUS, cfg, seed=0)
    vision = model.VisionProcessor.load(workdir)
    times = [round(0.5 * i, 1) for i in range(args.frames)]
    frames = torch.randint(0, 256, (args.frames, 3, args.size, args.size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    prompt = model.tokenize_prompt(tokenizer, data.render_prompt(QUESTION, times, 0.5 * args.frames), frames, vision)
    ids, _, _ = model.generate(vlm, prompt, args.group, args.completion, [], tokenizer.pad_token_id,
                               generator=torch.Generator().manual_seed(0),
                               banned_ids=model.vision_token_ids(tokenizer))
    rewards = torch.rand(args.group, generator=torch.Generator().manual_seed(0))
    torch.save({"prompt": prompt, "ids": ids, "adv": grpo.group_advantages(rewards)}, os.path.join(workdir, "bench.pt"))
    return len(prompt), int(prompt.mm_token_type_ids.sum())


def run_child(path, workdir):
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--path={path}", f"--workdir={workdir}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{path} path failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdict(ok):
    return "met" if ok else "MISSED"


def main():
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()
    if args.path:
        return run_path(args)
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
    diff, tol = abs(s["loss"] - p["loss"]), 1e-5 if args.device == "cpu" else 5e-2
    print(f"\nfwd+bwd speed-up {fb:.1f}x (target >= 5x: {verdict(fb >= 5)})")
    print(f"step speed-up    {st:.1f}x (target >= 3x: {verdict(st >= 3)})")
    print(f"peak memory      shared / plain = {mem:.2f} (target < 1: {verdict(mem < 1)})")
    print(f"loss |diff|      {diff:.2e} (target <= {tol:g}: {verdict(diff <= tol)})")


if __name__ == "__main__":
    main()
