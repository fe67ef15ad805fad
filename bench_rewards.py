"""What the two reward rule sets pay for perfect, partial, noisy and dummy completions.

On the spatio-temporal records of a synthetic split, builds from each record's ground truth:
perfect (every key-frame object claimed), perfect minus one claim (each claim in turn), the first
claim only, noisy (every box shifted a few pixels, every time moved up to 0.3 s), the best noisy
claim only, and the perfect think with an empty or a '.' answer; scores each with
RewardConfig() (ours) and RewardConfig.released(), and prints the mean of every reward component
(over the records it applies to; n in the last column) at training progress 0.9 (sigma = 1 s).

With --predictions=<eval.py's stgr_predictions.jsonl>, scores a checkpoint's own completions
instead: every STGR record of --data that has a prediction, under both rule sets (boxes in pixels
of the frame the model saw: the row's frame_size, else the record's meta size).

Run: python synth.py --out /tmp/synth --n-train 0 --n-val 0 --n-test 200   (once)
     python bench_rewards.py --data=/tmp/synth/test.json
     python bench_rewards.py --data=/tmp/synth/test.json --predictions=runs/x/eval/stgr_predictions.jsonl
"""
import json
import random
import sys

import rewards

COLUMNS = ("answer", "format", "temporal_point", "spatial", "total")


def claim_text(name, boxes, t):
    boxes = "".join(f"<box>[{', '.join(str(round(v)) for v in b)}]</box>" for b in boxes)
    return f"<obj>{name}</obj>{boxes}at<t>{t:.1f}</t>s"


def completion(claims, answer):
    return f"<think>I see {', then '.join(claims)}.</think><answer>{answer}</answer>"


def noisy(claim, rng):
    boxes = [[v + rng.randint(-3, 3) for v in b] for b in claim.boxes]
    return claim_text(claim.name, boxes, max(0.0, claim.time + rng.uniform(-0.3, 0.3)))


def variants(record, ctx, rng):
    """{name: [completion texts]} for one record (several texts: their scores are averaged)."""
    perfect = rewards.ground_truth_completion(record, ctx)
    p = rewards.parse_completion(perfect)
    claims = [claim_text(c.name, c.boxes, c.time) for c in p.claims]
    noisy_claims = [noisy(c, rng) for c in p.claims]
    per_claim = rewards.RewardConfig(claim_norm="all")  # one claim's own score, nothing else counted
    best = max(noisy_claims, key=lambda x: rewards.spatial_reward(completion([x], p.answer), record, ctx, per_claim))
    return {"perfect": [perfect],
            "minus one claim": [completion(claims[:i] + claims[i + 1:], p.answer) for i in range(len(claims))],
            "first claim only": [completion(claims[:1], p.answer)],
            "noisy": [completion(noisy_claims, p.answer)],
            "best noisy claim only": [completion([best], p.answer)],
            "empty answer": [completion(claims, "")],
            "'.' answer": [completion(claims, ".")]}


def main(path):
    records = [r for r in json.load(open(path)) if rewards.is_spatiotemporal(r)]
    rules = {"ours": rewards.RewardConfig(), "released": rewards.RewardConfig.released()}
    sums = {}  # (variant, rules, column) -> [sum, n]
    for i, rec in enumerate(records):
        ctx = rewards.RewardContext(rec["meta"]["width"], rec["meta"]["height"], progress=0.9)
        for name, texts in variants(rec, ctx, random.Random(i)).items():
            for rname, cfg in rules.items():
                rows = [rewards.score_completion(t, rec, ctx, cfg) for t in texts]
                for col in COLUMNS:
                    if col in rows[0]:
                        acc = sums.setdefault((name, rname, col), [0.0, 0])
                        acc[0] += sum(r[col] for r in rows) / len(rows)
                        acc[1] += 1
    print(f"{len(records)} spatio-temporal records of {path}\n")
    print("| completion | rules | " + " | ".join(COLUMNS) + " | n (grounded) |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))
    for name in variants(records[0], rewards.RewardContext(112, 112), random.Random(0)):
        for rname in rules:
            cells = [f"{s / n:.3f}" if n else "-" for s, n in (sums.get((name, rname, c), (0, 0)) for c in COLUMNS)]
            print(f"| {name} | {rname} | " + " | ".join(cells) + f" | {sums.get((name, rname, 'spatial'), (0, 0))[1]} |")


def score_predictions(data_path, pred_path):
    """A checkpoint's completions (eval.py's STGR predictions) under both rule sets, per task and over
    all records: the mean of every reward component where it applies, at progress 1.0 (as eval.py)."""
    records = {r["id"]: r for r in json.load(open(data_path))}
    rules = {"ours": rewards.RewardConfig(), "released": rewards.RewardConfig.released()}
    sums = {}  # (task, rules, column) -> [sum, n]
    with open(pred_path) as f:
        preds = [json.loads(line) for line in f if line.strip()]
    for row in preds:
        rec = records[row["id"]]
        w, h = row.get("frame_size") or (rec["meta"]["width"], rec["meta"]["height"])
        ctx = rewards.RewardContext(w, h, progress=1.0)
        for rname, cfg in rules.items():
            scores = rewards.score_completion(row["completion"], rec, ctx, cfg)
            for task in (rec["task"], "all"):
                for col in COLUMNS:
                    if col in scores:
                        acc = sums.setdefault((task, rname, col), [0.0, 0])
                        acc[0] += scores[col]
                        acc[1] += 1
    print(f"{len(preds)} completions of {pred_path} on {data_path}\n")
    print("| task | rules | " + " | ".join(COLUMNS) + " | n |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))
    for task in sorted({t for t, _, _ in sums}, key=lambda t: (t == "all", t)):
        for rname in rules:
            cells = [f"{s / n:.3f}" if n else "-" for s, n in (sums.get((task, rname, c), (0, 0)) for c in COLUMNS)]
            print(f"| {task} | {rname} | " + " | ".join(cells) + f" | {sums.get((task, rname, 'total'), (0, 0))[1]} |")


if __name__ == "__main__":
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
    if "predictions" in args:
        score_predictions(args.get("data", "data/synth/test.json"), args["predictions"])
    else:
        main(args.get("data", "data/synth/test.json"))
