"""selector.py: label rule (ties to raw), label making on a tiny set, the head, cached predictions."""
import json
import os

import torch

import prompt as P
import selector as S
import train as T


def test_label_is_the_argmax_and_ties_go_to_raw():
    s = dict.fromkeys(P.VISUAL_PROMPTS, 0.5)
    assert S.label_of(s) == "raw"
    s["spotlight"] = 0.7
    s["darken"] = 0.7                     # a tie between two prompts keeps the earlier one
    assert S.label_of(s) == "darken"
    s["raw"] = 0.9
    assert S.label_of(s) == "raw"


def test_head_learns_a_separable_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 16, generator=g)
    y = (x[:, 0] > 0).long() * 3          # class 0 (raw) or 3 (frame_numbers)
    head = S.train_head(x, y, steps=200)
    report = S.evaluate_head(head, x, y, [{k: float(i == int(t)) for i, k in enumerate(P.VISUAL_PROMPTS)} for t in y])
    assert report["accuracy"] > 0.95 and report["score_selector"] > 0.95 and report["score_oracle"] == 1.0


def test_label_making_on_a_tiny_set(tiny_data, tiny_model_dir, tmp_path):
    cfg = T.Config(out_dir=str(tmp_path), data_dir=tiny_data, selector_samples=3, selector_group=1,
                   max_new_tokens=8, max_frames=6, stage="selector")
    rt = T.setup_runtime(cfg)
    S.stage_selector(cfg, rt, tiny_model_dir)
    out = tmp_path / "selector"
    labels = [json.loads(l) for l in open(out / "labels.jsonl")]
    assert len(labels) == 3
    for row in labels:
        assert set(row["scores"]) == set(P.VISUAL_PROMPTS) and row["label"] == S.label_of(row["scores"])
    predictions = json.load(open(out / "predictions.json"))
    records = T.load_train_records(cfg)
    import distill
    assert set(predictions) == {str(r["id"]) for r in records if distill.can_prompt(r)}
    assert set(predictions.values()) <= set(P.VISUAL_PROMPTS)
    report = json.load(open(out / "report.json"))
    assert sum(report["label_counts"].values()) == 3
