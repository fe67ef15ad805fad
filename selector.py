"""The VP-Selector: which visual prompt helps this sample most? Labels, training, cached predictions.

    python train.py --stage=selector --model=runs/default/sft/last

Label making (paper Sec. 3.3): for each of `selector_samples` training samples with key objects,
every prompt type in prompt.VISUAL_PROMPTS is drawn on the key frames (plus its hint), a frozen
proxy reasoner (the SFT checkpoint) answers `selector_group` times, and the type is scored by
answer reward + grounding reward (spatial + temporal point), averaged over the answers. The label
is the argmax, ties going to raw (raw comes first in VISUAL_PROMPTS and only a strictly higher
score beats it).

The selector: a small MLP head on the frozen proxy's mean-pooled last hidden states of the RAW
prompt (video frames + question), so it sees exactly what the policy sees. Trained with
cross-entropy on 80% of the labelled samples; the other 20% measure accuracy against always
predicting the majority class, and the reward it recovers against the per-sample oracle.
Predictions for every training sample are cached in {out_dir}/selector/predictions.json
(id -> prompt type), which distill.Coach reads during RL.
Departure: the paper's selector is a separate text+vision model; ours reuses the proxy's states
(no second backbone to train or ship).
"""
import json
import os
import random

import torch
from tqdm import tqdm

import data as D
import distill
import model as M
import prompt as P
import rewards as R

GROUNDING = ("spatial", "temporal_point")


@torch.no_grad()
def pooled_features(model, prompt):
    """Mean of the last hidden states over the prompt's tokens. -> (D,) float32."""
    out, _ = M.prompt_forward(model, prompt)
    return out.last_hidden_state[0].float().mean(0)


def prompt_scores(model, tokenizer, vision, cfg, record, rt):
    """Score of every prompt type on one record (mean over G answers of answer + grounding
    reward), and the raw prompt (the selector's input), from one decode of the video."""
    import grpo
    import train as T
    video = D.load_video_sample(record, T.frame_config(cfg))
    scores, raw_prompt = {}, None
    for kind in P.VISUAL_PROMPTS:
        v = distill.prompted_video(video, record, kind) if kind != "raw" else video
        prompt = T.build_prompt(record, tokenizer, vision, cfg, v, P.add_hint(record["question"], kind))
        prompt = prompt.to(rt.device, rt.dtype)
        if raw_prompt is None:                                # raw is first in VISUAL_PROMPTS
            raw_prompt = prompt
        g = grpo.rollout(model, tokenizer, record, prompt, cfg, 0.0, cfg.selector_group)
        per = [g.rewards["answer"][i] + sum(g.rewards.get(k, [0.0] * len(g.texts))[i] for k in GROUNDING)
               for i in range(len(g.texts))]
        scores[kind] = sum(per) / len(per)
    return scores, raw_prompt


def label_of(scores):
    """Argmax over VISUAL_PROMPTS order; a tie keeps the earlier type (raw first)."""
    best = P.VISUAL_PROMPTS[0]
    for kind in P.VISUAL_PROMPTS[1:]:
        if scores[kind] > scores[best]:
            best = kind
    return best


class SelectorHead(torch.nn.Module):
    def __init__(self, dim, hidden=64, n_classes=len(P.VISUAL_PROMPTS)):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, n_classes))

    def forward(self, x):
        return self.net(x)


def train_head(features, labels, steps=300, lr=3e-3, seed=0):
    """Full-batch AdamW on cross-entropy. features (N, D), labels (N,) -> SelectorHead."""
    torch.manual_seed(seed)
    head = SelectorHead(features.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


def evaluate_head(head, features, labels, score_table):
    """Accuracy vs majority class, and mean score of the predicted type vs the oracle's and raw's."""
    with torch.no_grad():
        pred = head(features).argmax(-1)
    majority = int(torch.bincount(labels, minlength=len(P.VISUAL_PROMPTS)).argmax())
    picked = [s[P.VISUAL_PROMPTS[int(p)]] for s, p in zip(score_table, pred)]
    oracle = [max(s.values()) for s in score_table]
    return {"n": len(labels), "accuracy": (pred == labels).float().mean().item(),
            "majority_accuracy": (labels == majority).float().mean().item(),
            "majority_class": P.VISUAL_PROMPTS[majority],
            "score_selector": sum(picked) / len(picked), "score_oracle": sum(oracle) / len(oracle),
            "score_raw": sum(s["raw"] for s in score_table) / len(score_table),
            "score_majority": sum(s[P.VISUAL_PROMPTS[majority]] for s in score_table) / len(score_table)}


def stage_selector(cfg, rt, proxy_path):
    """Make labels with the frozen proxy, train the head, cache a prediction for every training id."""
    import train as T
    out = cfg.selector_dir or os.path.join(cfg.out_dir, "selector")
    if os.path.isfile(os.path.join(out, "predictions.json")) and cfg.resume:
        T.log(rt, f"[selector] cached predictions found in {out}; skipping")
        return
    if rt.main:
        model, tokenizer, vision = T.prepare_policy(cfg, rt, proxy_path)
        model.eval().requires_grad_(False)
        records = T.load_train_records(cfg)
        report = run_selector(cfg, rt, model, tokenizer, vision, records, out)
        T.log(rt, f"[selector] {json.dumps(report)}")
    rt.accelerator.wait_for_everyone()


def run_selector(cfg, rt, model, tokenizer, vision, records, out):
    import train as T
    os.makedirs(out, exist_ok=True)
    rng = random.Random(cfg.seed)
    pool = [r for r in records if distill.can_prompt(r)]
    chosen = rng.sample(pool, min(cfg.selector_samples, len(pool)))
    feats, labels, tables = [], [], []
    with open(os.path.join(out, "labels.jsonl"), "w") as f:
        for rec in tqdm(chosen, desc="selector labels", disable=not rt.main):
            scores, raw_prompt = prompt_scores(model, tokenizer, vision, cfg, rec, rt)
            label = label_of(scores)
            f.write(json.dumps({"id": rec["id"], "scores": scores, "label": label}) + "\n")
            feats.append(pooled_features(model, raw_prompt))
            labels.append(P.VISUAL_PROMPTS.index(label))
            tables.append(scores)
    feats, labels = torch.stack(feats).cpu(), torch.tensor(labels)
    n_train = max(1, int(0.8 * len(labels)))
    head = train_head(feats[:n_train], labels[:n_train], seed=cfg.seed)
    report = {"label_counts": {k: int((labels == i).sum()) for i, k in enumerate(P.VISUAL_PROMPTS)},
              "train": evaluate_head(head, feats[:n_train], labels[:n_train], tables[:n_train]),
              "heldout": evaluate_head(head, feats[n_train:], labels[n_train:], tables[n_train:])
              if len(labels) > n_train else None}
    torch.save(head.state_dict(), os.path.join(out, "head.pt"))
    predictions = predict_all(head, model, tokenizer, vision, cfg, rt, records)
    with open(os.path.join(out, "predictions.json"), "w") as f:
        json.dump(predictions, f)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def predict_all(head, model, tokenizer, vision, cfg, rt, records):
    """id -> predicted prompt type for every record that can be prompted."""
    import train as T
    predictions = {}
    for rec in tqdm(records, desc="selector predict", disable=not rt.main):
        if not distill.can_prompt(rec):
            continue
        x = pooled_features(model, T.build_prompt(rec, tokenizer, vision, cfg).to(rt.device, rt.dtype))
        with torch.no_grad():
            predictions[str(rec["id"])] = P.VISUAL_PROMPTS[int(head(x.cpu()[None]).argmax())]
    return predictions
