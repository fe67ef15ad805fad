"""The VP-Selector: which visual prompt (vp) helps this sample most? Scores, labels, the head.

A library: the score of one vp on one sample from a group of scored answers, the label rule, the
small MLP head, its training and its evaluation. The loops (labelling samples with a frozen proxy,
predicting a vp for each training id RL draws) are train.py's `stage_selector`.

    python train.py --stage=selector --model=runs/default/sft/last

Label making (paper Sec. 3.3): for each of `selector_samples` training samples with key objects,
every vp in prompt.VISUAL_PROMPTS is drawn on the key frames (plus its hint), a frozen proxy
reasoner (the SFT checkpoint) answers `selector_group` times, and the vp is scored by answer
reward + grounding reward (spatial + temporal point), averaged over the answers (`vp_score`). The
label is the argmax, ties going to raw (raw comes first in VISUAL_PROMPTS and only a strictly
higher score beats it; `label_of`).

The selector: a small MLP head on the frozen proxy's mean-pooled last hidden states of the RAW
model input (video frames + question), so it sees exactly what the policy sees. Trained with
cross-entropy on `selector_train_share` of the labelled samples; the rest measure accuracy against
always predicting the majority class, and the reward it recovers against the per-sample oracle.
Predictions for every training sample are cached in {out_dir}/selector/predictions.json
(id -> vp), which the RL stage hands to distill.Coach.
Departure: the paper's selector is a separate text+vision model; ours reuses the proxy's states
(no second backbone to train or ship).

Test: python -m pytest tests/test_selector.py
"""
import torch

import model
import prompt

GROUNDING = ("spatial", "temporal_point")


@torch.no_grad()
def pooled_features(vlm, inputs):
    """Mean of the last hidden states over the model input's tokens. -> (D,) float32."""
    out, _ = model.prompt_forward(vlm, inputs)
    return out.last_hidden_state[0].float().mean(0)


def vp_score(table):
    """A vp's score on one sample from its scored answers ({reward: [n floats]}, grpo.Group.rewards):
    the mean over answers of answer reward + grounding rewards (absent rewards count 0)."""
    n = len(table["answer"])
    per = [table["answer"][i] + sum(table.get(k, [0.0] * n)[i] for k in GROUNDING) for i in range(n)]
    return sum(per) / len(per)


def label_of(scores):
    """Argmax over VISUAL_PROMPTS order; a tie keeps the earlier vp (raw first)."""
    best = prompt.VISUAL_PROMPTS[0]
    for vp in prompt.VISUAL_PROMPTS[1:]:
        if scores[vp] > scores[best]:
            best = vp
    return best


class SelectorHead(torch.nn.Module):
    def __init__(self, dim, hidden=64, n_classes=len(prompt.VISUAL_PROMPTS)):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, n_classes))

    def forward(self, x):
        return self.net(x)


def train_head(features, labels, steps=300, lr=3e-3, seed=0, hidden=64):
    """Full-batch AdamW on cross-entropy. features (N, D), labels (N,) -> SelectorHead."""
    torch.manual_seed(seed)
    head = SelectorHead(features.shape[1], hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


@torch.no_grad()
def predict(head, features):
    """The vp the head picks for one sample's features (D,)."""
    return prompt.VISUAL_PROMPTS[int(head(features.cpu()[None]).argmax())]


def evaluate_head(head, features, labels, score_table):
    """Accuracy vs majority class, and mean score of the predicted vp vs the oracle's and raw's."""
    with torch.no_grad():
        pred = head(features).argmax(-1)
    majority = int(torch.bincount(labels, minlength=len(prompt.VISUAL_PROMPTS)).argmax())
    picked = [s[prompt.VISUAL_PROMPTS[int(p)]] for s, p in zip(score_table, pred)]
    oracle = [max(s.values()) for s in score_table]
    return {"n": len(labels), "accuracy": (pred == labels).float().mean().item(),
            "majority_accuracy": (labels == majority).float().mean().item(),
            "majority_class": prompt.VISUAL_PROMPTS[majority],
            "score_selector": sum(picked) / len(picked), "score_oracle": sum(oracle) / len(oracle),
            "score_raw": sum(s["raw"] for s in score_table) / len(score_table),
            "score_majority": sum(s[prompt.VISUAL_PROMPTS[majority]] for s in score_table) / len(score_table)}
