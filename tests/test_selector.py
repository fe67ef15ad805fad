"""selector.py: label rule (ties to raw), vp scores, the head; train.py's label making on a tiny set."""
import json

import pytest
import torch

import distill
import prompt
import selector
import train


def test_label_is_the_argmax_and_ties_go_to_raw():
    s = dict.fromkeys(prompt.VISUAL_PROMPTS, 0.5)
    assert selector.label_of(s) == "raw"
    s["spotlight"] = 0.7
    s["darken"] = 0.7                     # a tie between two prompts keeps the earlier one
    assert selector.label_of(s) == "darken"
    s["raw"] = 0.9
    assert selector.label_of(s) == "raw"


def test_vp_score_is_answer_plus_grounding_averaged():
    table = {"answer": [1.0, 0.0], "format": [1.0, 1.0], "spatial": [0.5, 0.25], "temporal_point": [0.1, 0.3],
             "total": [2.6, 1.55]}
    assert selector.vp_score(table) == pytest.approx(((1.0 + 0.5 + 0.1) + (0.0 + 0.25 + 0.3)) / 2)  # format: no
    assert selector.vp_score({"answer": [0.2, 0.4], "total": [1.0, 1.0]}) == pytest.approx(0.3)     # temporal task


def test_head_learns_a_separable_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 16, generator=g)
    y = (x[:, 0] > 0).long() * 3          # class 0 (raw) or 3 (frame_numbers)
    head = selector.train_head(x, y, steps=200)
    report = selector.evaluate_head(head, x, y, [{k: float(i == int(t)) for i, k in enumerate(prompt.VISUAL_PROMPTS)}
                                                 for t in y])
    assert report["accuracy"] > 0.95 and report["score_selector"] > 0.95 and report["score_oracle"] == 1.0
    assert selector.predict(head, x[0]) == prompt.VISUAL_PROMPTS[int(y[0])]


def test_label_making_on_a_tiny_set(tiny_data, tiny_model_dir, tmp_path):
    cfg = train.Config(out_dir=str(tmp_path), data_dir=tiny_data, selector_samples=3, selector_group=1,
                       max_new_tokens=8, max_frames=6, stage="selector", selector_hidden=8, selector_steps=5,
                       rl_steps=2, batch_size=2)
    rt = train.setup_runtime(cfg)
    train.stage_selector(cfg, rt, tiny_model_dir)
    out = tmp_path / "selector"
    labels = [json.loads(l) for l in open(out / "labels.jsonl")]
    assert len(labels) == 3
    for row in labels:
        assert set(row["scores"]) == set(prompt.VISUAL_PROMPTS) and row["label"] == selector.label_of(row["scores"])
    # --selector_predict=rl (default): a prediction for each promptable id RL draws in its 2 steps, the
    # one a prediction for every id (--selector_predict=all) gives it
    predictions = json.load(open(out / "predictions.json"))
    records = train.load_train_records(cfg)
    drawn = {str(records[i]["id"]) for step in range(2) for i in train.rl_batch(cfg, len(records), step)}
    assert {str(r["id"]) for r in train.rl_drawn(cfg, records)} == drawn
    promptable = {str(r["id"]) for r in records if distill.can_prompt(r)}
    assert set(predictions) == drawn & promptable and 0 < len(predictions) < len(promptable)
    state = torch.load(out / "head.pt")
    head = selector.SelectorHead(state["net.1.weight"].shape[1], hidden=8)
    head.load_state_dict(state)
    proxy = train.load_policy(cfg, rt, tiny_model_dir, trainable=False)
    every = train.selector_predictions(cfg, rt, proxy, head, records)
    assert set(every) == promptable and {k: every[k] for k in predictions} == predictions
    assert set(predictions.values()) <= set(prompt.VISUAL_PROMPTS)
    report = json.load(open(out / "report.json"))
    assert sum(report["label_counts"].values()) == 3
    assert state["net.1.weight"].shape[0] == 8               # --selector_hidden reaches the head


def test_batched_label_making_equals_one_record_at_a_time(tiny_data, tiny_policy, monkeypatch):
    import rewards

    def by_text(texts, record, ctx, cfg):                # a score that depends on every sampled token
        return {"answer": [sum(map(ord, t)) % 97 / 97 for t in texts], "total": [0.0] * len(texts)}

    monkeypatch.setattr(rewards, "score_group", by_text)
    scores = {}
    for bp in (1, 4):                                    # 3 records x 5 vps: 15 prompts, chunks of 4
        cfg = train.Config(data_dir=tiny_data, selector_group=2, max_new_tokens=8, max_frames=6, batch_prompts=bp)
        rt = train.setup_runtime(cfg)
        records = [r for r in train.load_train_records(cfg) if distill.can_prompt(r)][:3]
        scores[bp] = [s for s, _ in train.vp_scores(cfg, rt, tiny_policy, records)]
    assert scores[4] == scores[1]
    assert len({v for s in scores[1] for v in s.values()}) > 5    # the scores differ: the test can fail
