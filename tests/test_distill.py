"""distill.py: the hard gate, candidate selection, the SD loss, drawn visual prompts, the coach."""
import dataclasses
import json
import os
from collections import Counter

import pytest
import torch

import data
import distill
import prompt
import train


@pytest.mark.parametrize("totals, k, hard", [
    ([1.0, 2.0, 3.0], 2.21, True),       # mean 2.0 < 2.21
    ([2.21, 2.21], 2.21, False),         # equal to k is not hard
    ([0.0, 4.5], 2.21, False),           # mean 2.25
    ([0.0, 0.0, 0.0, 0.1], 0.03, True),  # mean 0.025
])
def test_is_hard_is_mean_below_k(totals, k, hard):
    assert distill.is_hard(totals, k) is hard


@pytest.mark.parametrize("raw_mean, totals, answers, n, expected", [
    (1.0, [0.5, 1.5, 2.0, 1.2], [0.0, 1.0, 0.5, 1.0], 2, [1, 3]),     # beat 1.0: 1, 2, 3; top-2 answers (tie keeps order)
    (1.0, [0.5, 1.5, 2.0, 1.2], [0.0, 1.0, 0.5, 1.0], 1, [1]),
    (1.0, [1.0, 0.2, 0.9, 1.0], [1.0, 1.0, 1.0, 1.0], 2, []),         # equal to the mean is not better: empty
    (0.0, [0.1, 0.1, 0.1, 0.1], [0.3, 0.3, 0.9, 0.3], 2, [2, 0]),
    (0.0, [0.2, 0.4], [0.0, 0.0], 5, [0, 1]),                          # fewer candidates than N
])
def test_select_candidates(raw_mean, totals, answers, n, expected):
    assert distill.select_candidates(raw_mean, totals, answers, n) == expected


def test_sd_nll_is_length_normalized_mean():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.1], [0.25, 0.9, 0.9]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    expected = (-(2 * torch.log(torch.tensor(0.5))) / 2 - torch.log(torch.tensor(0.25))) / 2
    torch.testing.assert_close(distill.sd_nll(logp, mask), expected)


def test_coach_counts_and_summary_by_hand():
    a = distill.coach_counts("darken", None, 1.0, [0.5, 1.5, 2.0, 1.2], 2)
    b = distill.coach_counts("raw", "no_key_objects", 2.0, [1.0, 3.0], 0)
    assert a["candidates"] == 3 and a["kept"] == 2 and a["lift_sum/darken"] == pytest.approx(0.3)
    assert b["fallback/no_key_objects"] == 1 and b["chosen/raw"] == 1 and b["candidates"] == 1
    counts = Counter()
    counts.update(a), counts.update(b)                      # how the RL step adds them up (zeros kept)
    m = distill.coach_summary(counts, n_groups=4)
    assert m["coach/hard_share"] == 0.5                     # 2 hard of 4 groups
    assert m["coach/lift/darken"] == pytest.approx(0.3) and m["coach/lift/raw"] == 0.0
    assert m["coach/kept"] == 2 and m["coach/candidates"] == 4 and "coach/lift_n/raw" not in m


def test_draw_vp_changes_only_key_frames(tiny_data):
    rec = next(r for r in data.load_records(os.path.join(tiny_data, "train.json")) if distill.can_prompt(r))
    video = data.load_video_sample(rec)
    assert distill.draw_vp(video, rec, "raw") is video
    drawn = distill.draw_vp(video, rec, "darken")
    keys = set(video.key_positions.values())
    for i in range(len(video.times)):
        same = torch.equal(drawn.frames[i], video.frames[i])
        assert same == (i not in keys), i
    kf = rec["key_frames"][0]
    box = next(iter(rec["key_items"][str(kf["idx"])].values()))[0]
    x1, y1, x2, y2 = data.norm_box_to_pixels(box, 112, 112)
    pos = video.key_positions[kf["idx"]]
    cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
    assert torch.equal(drawn.frames[pos][:, cy, cx], video.frames[pos][:, cy, cx])   # inside: untouched
    assert drawn.frames[pos][:, 0, 0].sum() < video.frames[pos][:, 0, 0].sum() or video.frames[pos][:, 0, 0].sum() == 0
    weaker = distill.draw_vp(video, rec, "darken", prompt.VisualPromptConfig(darken_factor=0.9))
    assert (weaker.frames[pos].float().sum() > drawn.frames[pos].float().sum())      # the strength knob reaches the pixels


def test_coach_modes_and_fallbacks():
    for bad in ("sometimes", "fixed:glitter", "none"):
        with pytest.raises(ValueError):
            distill.Coach(bad)
    keyed = {"id": 1, "key_frames": [{"idx": 3, "time": 1.0}], "key_items": {"3": {"x": [[0, 0, 1, 1]]}}}
    assert distill.Coach("fixed:spotlight").choose(keyed) == ("spotlight", None)
    vp, why = distill.Coach("random").choose(keyed, (0, 1, 2))
    assert vp in prompt.VISUAL_PROMPTS[1:] and why is None
    assert distill.Coach("random").choose(keyed, (0, 1, 2)) == (vp, None)          # seeded by the key
    sel = distill.Coach("selector", {"1": "darken"})
    assert sel.choose(keyed) == ("darken", None)
    assert sel.choose({**keyed, "id": 2}) == ("raw", "selector_miss")
    assert sel.choose({"id": 1, "key_frames": [], "key_items": {}}) == ("raw", "no_key_objects")
    assert not distill.can_prompt({"key_frames": [], "key_items": {}})
    assert not distill.can_prompt({"key_frames": [{"idx": 3, "time": 1.0}], "key_items": {"3": {}}})


def test_selector_cache_misses_are_counted_and_announced(tmp_path, capsys):
    records = [{"id": "a", "key_frames": [{"idx": 1, "time": 0.5}], "key_items": {"1": {"x": [[0, 0, 1, 1]]}}},
               {"id": "b", "key_frames": [{"idx": 1, "time": 0.5}], "key_items": {"1": {"x": [[0, 0, 1, 1]]}}},
               {"id": "t", "key_frames": [], "key_items": {}}]                     # not promptable: not a miss
    (tmp_path / "selector").mkdir()
    (tmp_path / "selector" / "predictions.json").write_text(json.dumps({"a": "darken"}))
    cfg = train.Config(out_dir=str(tmp_path), coach="selector", batch_size=1, rl_steps=3)   # RL draws all 3
    coach = train.make_coach(cfg, records)
    assert "misses 1 of the 2 promptable training ids RL draws" in capsys.readouterr().out
    for steps in (1, 2):                                        # fewer steps draw fewer ids: a miss only if b is drawn
        drawn = {records[train.rl_batch(cfg, 3, k)[0]]["id"] for k in range(steps)}
        train.make_coach(dataclasses.replace(cfg, rl_steps=steps), records)
        assert ("misses 1 of the" in capsys.readouterr().out) == ("b" in drawn)
    assert coach.choose(records[1]) == ("raw", "selector_miss")
    assert train.make_coach(train.Config(coach="none"), records) is None
    with pytest.raises(SystemExit, match="run --stage=selector first"):
        train.make_coach(train.Config(out_dir=str(tmp_path / "none"), coach="selector"), records)
