"""The experiment: does VisionCoach beat plain GRPO on the embedded default? One command.

    python experiment.py                       # 3 seeds, every arm, then the table and plots
    python experiment.py --seeds=0,1,2 --rl_steps=40 --arms=grpo,visioncoach
    python experiment.py --preset=quick        # a first look: 1 seed, GRPO vs VisionCoach, 20 RL steps
    python experiment.py --calibrate=200       # choose --hard_k on the validation split, then stop

SFT and the VP-Selector run once (the main job's, under --base, made if missing); then, for each
seed, RL for every arm, each from the same SFT checkpoint; then eval.py on the synthetic test
split (raw videos, greedy) for the SFT checkpoint and every RL checkpoint, and (unless
--no_perception=0) for an SFT from a random tiny model instead of the perception checkpoint. Writes
{out}/results.md (mean +/- std over seeds), {out}/results.json and PNG plots (training reward per
arm, hard share over time, test metrics per arm). Runs that finished are skipped, so the command
can be stopped and started again. Tuning belongs on the validation split: this script only reads
the test split at the end.
"""
import json
import os
import statistics
import subprocess
import sys

import distill
import train

ARMS = {  # arm -> train.py overrides
    "grpo": ["--coach=none"],
    "visioncoach": ["--coach=selector"],
    "random_prompt": ["--coach=random"],
    "prompts_no_sd": ["--coach=selector", "--alpha=0"],  # the update is GRPO's exactly (prompted rollouts unused)
    "sd_raw": ["--coach=selector", "--sd_condition=raw"],  # distil the prompted rollouts as if the video were raw
    "no_identity": ["--coach=selector", "--reward_identity=none"],
}
METRICS = ["mAM", "mLGM", "Acc", "mtIoU_1", "mvIoU_1", "stgr/Acc", "stgr/reward/total", "stgr/reward/spatial",
           "stgr/TG/mIoU"]


# --preset=quick: a first look (one seed, GRPO against VisionCoach, shorter RL and eval, its own
# output folder); flags given beside it still win.
PRESETS = {"quick": {"seeds": "0", "arms": "grpo,visioncoach", "rl_steps": "20", "eval_samples": "50",
                     "out": "runs/experiment_quick", "no_perception": "0"}}


def parse(argv):
    opts = {"seeds": "0,1,2", "arms": ",".join(ARMS), "rl_steps": "40", "base": "runs/default",
            "out": "runs/experiment", "eval_samples": "100", "selector_samples": "256", "extra": "",
            "calibrate": "0", "preset": "", "no_perception": "1"}
    given = {}
    for a in argv:
        k, _, v = a.lstrip("-").partition("=")
        if k not in opts:
            raise SystemExit(f"unknown option {a}; options: {sorted(opts)}")
        given[k] = v
    preset = given.get("preset", "")
    if preset and preset not in PRESETS:
        raise SystemExit(f"--preset={preset!r}: expected one of {sorted(PRESETS)}")
    return {**opts, **PRESETS.get(preset, {}), **given}


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def selector_dir(o):
    return os.path.join(o["base"], f"selector_{o['selector_samples']}")


def data_and_sft(out_dir, *flags):
    """The main job's data and SFT stages into out_dir (each skipped when done) -> the SFT model."""
    for stage in ("data", "sft"):
        run([sys.executable, "train.py", f"--stage={stage}", f"--out_dir={out_dir}", *flags])
    return os.path.join(out_dir, "sft", "last")


def ensure_base(o, selector=True):
    """Data and SFT once (the main job's stages), and a selector trained on more labels."""
    sft = data_and_sft(o["base"])
    if not selector:
        return sft
    run([sys.executable, "train.py", "--stage=selector", f"--out_dir={o['base']}", f"--model={sft}",
         f"--selector_samples={o['selector_samples']}", f"--selector_dir={selector_dir(o)}",
         "--selector_predict=all"])                      # one selector for every seed's draws
    return sft


def sft_without_perception(o):
    """The main job's SFT on the same data from a random tiny model instead of the perception
    checkpoint (--base_model=tiny): the row that shows what the checkpoint adds."""
    return data_and_sft(os.path.join(o["base"], "no_perception"), "--base_model=tiny")


def evaluate(ckpt, out, o):
    if not os.path.isfile(os.path.join(out, "eval", "vstar_summary.json")):
        run([sys.executable, "train.py", "--stage=eval", f"--model={ckpt}", f"--out_dir={out}",
             f"--eval_samples={o['eval_samples']}"])
    return read_summary(out)


def read_summary(out):
    row = json.load(open(os.path.join(out, "eval", "vstar_summary.json")))
    stgr = json.load(open(os.path.join(out, "eval", "stgr_summary.json")))
    row.update({f"stgr/{k}": v for k, v in stgr.items()})
    return row


def extra_flags(o):
    """--extra's train.py flags (one string, space-separated), given to every RL run and to --calibrate."""
    return o["extra"].split()


def train_arm(arm, seed, sft, o):
    out = os.path.join(o["out"], f"{arm}_s{seed}")
    ckpt = os.path.join(out, "rl", "last")
    run([sys.executable, "train.py", "--stage=rl", f"--model={sft}", f"--out_dir={out}", f"--seed={seed}",
         f"--rl_steps={o['rl_steps']}", f"--selector_dir={selector_dir(o)}",
         *ARMS[arm], *extra_flags(o)])
    return ckpt, out


def mean_std(vals):
    return (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)


def table(results):
    lines = ["| arm | seeds | " + " | ".join(METRICS) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    for arm, rows in results.items():
        cells = []
        for m in METRICS:
            vals = [r[m] for r in rows if m in r]
            mu, sd = mean_std(vals) if vals else (float("nan"), 0.0)
            cells.append(f"{mu:.2f} ± {sd:.2f}")
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(out_dirs, key):
    """arm -> list over seeds of (steps, values) read from each run's metrics.jsonl."""
    res = {}
    for arm, dirs in out_dirs.items():
        for d in dirs:
            rows = [json.loads(l) for l in open(os.path.join(d, "rl", "metrics.jsonl"))]
            res.setdefault(arm, []).append(([r["step"] for r in rows], [r.get(key, 0.0) for r in rows]))
    return res


def plot(out_dirs, results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for key, name, ylabel in (("reward/total", "reward_curves.png", "mean total reward (training stream)"),
                              ("coach/hard_share", "hard_share.png", "share of hard groups")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, runs in curves(out_dirs, key).items():
            steps = runs[0][0]
            n = min(len(v) for _, v in runs)
            mean = [statistics.mean(v[i] for _, v in runs) for i in range(n)]
            smooth = [statistics.mean(mean[max(0, i - 4):i + 1]) for i in range(n)]   # 5-step moving mean
            ax.plot(steps[:n], smooth, label=arm)
        ax.set_xlabel("RL step"), ax.set_ylabel(ylabel), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout(), fig.savefig(os.path.join(out, name), dpi=110), plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, m in zip(axes, ("mAM", "mLGM", "stgr/reward/total")):
        arms = list(results)
        stats = [mean_std([r[m] for r in results[a]]) for a in arms]
        ax.bar(range(len(arms)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=3)
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8), ax.set_title(m)
    fig.tight_layout(), fig.savefig(os.path.join(out, "test_metrics.png"), dpi=110), plt.close(fig)


def lift_groups(records, means, k):
    """The groups whose prompts' lift calibration measures: hard (mean < k) and promptable. RL's coach
    re-draws a hard group without key objects raw (a temporal question has none: distill.Coach.choose),
    so prompting one here would measure the hint alone on a question RL never prompts."""
    return [r for r, m in zip(records, means) if m < k and distill.can_prompt(r)]


def calibrate(sft, o):
    """On the first n validation prompts, with the SFT checkpoint as RL starts: the hard share for a
    range of k and the k for 40 / 50 / 65% hard (the paper's run had 58%), then on the groups hard
    at the config's k that the coach can prompt, each visual prompt's mean reward against a fresh
    raw draw (the issue's "prompts help hard samples" check). --extra's flags apply as in the RL runs
    (--extra=--hard_k=2.07 measures the prompts on the groups hard at that k). -> {out}/k_calibration.json."""
    cfg = train.parse_args([f"--out_dir={o['base']}", *extra_flags(o)])
    rt = train.setup_runtime(cfg)
    bundle = train.load_policy(cfg, rt, sft, trainable=False)
    records, means = train.val_group_means(cfg, rt, bundle, int(o["calibrate"]))
    shares = {f"{k:.2f}": sum(m < k for m in means) / len(means) for k in [x / 4 for x in range(4, 13)]}
    picks = {f"{s:.2f}": train.k_for_share(means, s) for s in (0.4, 0.5, 0.65)}
    n_hard = sum(m < cfg.hard_k for m in means)
    hard = lift_groups(records, means, cfg.hard_k)
    by_vp = train.vp_group_means(cfg, rt, bundle, hard, draw="lift") if hard else {}
    vp_mean = {vp: statistics.mean(v) for vp, v in by_vp.items()}
    result = {"n": len(means), "group_means": means, "hard_share_at_k": shares, "k_for_share": picks,
              "k": cfg.hard_k, "hard_share_at_k_used": n_hard / len(means), "hard_promptable": len(hard),
              "hard_vp_mean": vp_mean,
              "hard_vp_lift": {vp: v / vp_mean["raw"] - 1 for vp, v in vp_mean.items()} if hard else {}}
    with open(os.path.join(o["out"], "k_calibration.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{len(means)} validation prompts, group means {min(means):.2f}..{max(means):.2f}; hard share at k: "
          + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()))
    print("k for 40% / 50% / 65% hard: " + " / ".join(f"{v:.2f}" for v in picks.values())
          + f" (k = {cfg.hard_k}: {n_hard} hard, {len(hard)} of them promptable)")
    for vp, v in vp_mean.items():
        print(f"  promptable hard groups, {vp:>13}: mean reward {v:.3f} ({100 * result['hard_vp_lift'][vp]:+.1f}% vs raw)")
    return result


def main(argv):
    o = parse(argv)
    os.makedirs(o["out"], exist_ok=True)
    if int(o["calibrate"]):
        return calibrate(ensure_base(o, selector=False), o)
    sft = ensure_base(o)
    results = {"sft": [evaluate(sft, os.path.join(o["out"], "sft"), o)]}
    if o["no_perception"] != "0":
        results["sft_no_perception"] = [evaluate(sft_without_perception(o), os.path.join(o["out"], "sft_no_perception"), o)]
    out_dirs = {}
    for seed in [int(s) for s in o["seeds"].split(",")]:
        for arm in o["arms"].split(","):
            ckpt, out = train_arm(arm, seed, sft, o)
            results.setdefault(arm, []).append(evaluate(ckpt, out, o))
            out_dirs.setdefault(arm, []).append(out)
            write(o, results, out_dirs, final=False)
    write(o, results, out_dirs, final=True)


def coach_table(out_dirs):
    """Per arm: hard share, and per prompt type the reward of prompted rollouts over the raw group
    mean on the same hard samples (summed over every step and seed; relative lift in %)."""
    lines = ["| arm | hard share | prompt type | hard groups | raw mean | prompted mean | lift |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for arm, dirs in out_dirs.items():
        rows = [json.loads(l) for d in dirs for l in open(os.path.join(d, "rl", "metrics.jsonl"))]
        hard = statistics.mean(r.get("coach/hard_share", 0.0) for r in rows)
        vps = sorted({k.split("/")[-1] for r in rows for k in r if k.startswith("coach/chosen/")})
        if not vps:
            lines.append(f"| {arm} | {hard:.2f} | - | - | - | - | - |")
        for vp in vps:
            n = sum(r.get(f"coach/chosen/{vp}", 0) for r in rows)
            raw = sum(r.get(f"coach/raw_sum/{vp}", 0.0) for r in rows)
            prompted = sum(r.get(f"coach/prompted_sum/{vp}", 0.0) for r in rows)
            lift = f"{100 * (prompted / raw - 1):+.1f}%" if raw else "-"   # no lift over a zero raw mean
            lines.append(f"| {arm} | {hard:.2f} | {vp} | {n} | {raw / max(1, n):.3f} | "
                         f"{prompted / max(1, n):.3f} | {lift} |")
    return "\n".join(lines)


def write(o, results, out_dirs, final):
    with open(os.path.join(o["out"], "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = table(results) + "\n\n" + coach_table(out_dirs)
    with open(os.path.join(o["out"], "results.md"), "w") as f:
        f.write(md + "\n")
    if final:
        plot(out_dirs, {k: v for k, v in results.items() if not k.startswith("sft")}, o["out"])
        print(md)


if __name__ == "__main__":
    main(sys.argv[1:])
