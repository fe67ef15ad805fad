"""distill.py: candidate selection, the SD loss, prompted frames, the coach's fallbacks."""
import os
from collections import Counter

import pytest
import torch

import data as D
import distill
import prompt as P


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


def test_prompted_video_changes_only_key_frames(tiny_data):
    rec = next(r for r in D.load_records(os.path.join(tiny_data, "train.json")) if distill.can_prompt(r))
    video = D.load_video_sample(rec)
    drawn = distill.prompted_video(video, rec, "darken")
    keys = set(video.key_positions.values())
    for i in range(len(video.times)):
        same = torch.equal(drawn.frames[i], video.frames[i])
        assert same == (i not in keys), i
    kf = rec["key_frames"][0]
    box = next(iter(rec["key_items"][str(kf["idx"])].values()))[0]
    x1, y1, x2, y2 = D.norm_box_to_pixels(box, 112, 112)
    pos = video.key_positions[kf["idx"]]
    cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
    assert torch.equal(drawn.frames[pos][:, cy, cx], video.frames[pos][:, cy, cx])   # inside: untouched
    assert drawn.frames[pos][:, 0, 0].sum() < video.frames[pos][:, 0, 0].sum() or video.frames[pos][:, 0, 0].sum() == 0


def test_coach_modes_and_fallbacks():
    with pytest.raises(SystemExit):
        distill.Coach("sometimes")
    with pytest.raises(SystemExit):
        distill.Coach("fixed:glitter")
    c = Counter()
    assert distill.Coach("fixed:spotlight").choose({"id": 1}, c) == "spotlight"
    assert distill.Coach("random").choose({"id": 1}, c, (0, 1, 2)) in P.VISUAL_PROMPTS[1:]
    sel = distill.Coach("selector", {"1": "darken"})
    assert sel.choose({"id": 1}, c) == "darken"
    assert sel.choose({"id": 2}, c) == "raw" and c["fallback/selector_miss"] == 1
    assert not distill.can_prompt({"key_frames": [], "key_items": {}})
    assert not distill.can_prompt({"key_frames": [{"idx": 3, "time": 1.0}], "key_items": {"3": {}}})


def test_selector_cache_misses_are_counted_and_announced(tmp_path, capsys):
    import json
    import train as T
    records = [{"id": "a", "key_frames": [{"idx": 1, "time": 0.5}], "key_items": {"1": {"x": [[0, 0, 1, 1]]}}},
               {"id": "b", "key_frames": [{"idx": 1, "time": 0.5}], "key_items": {"1": {"x": [[0, 0, 1, 1]]}}},
               {"id": "t", "key_frames": [], "key_items": {}}]                     # not promptable: not a miss
    (tmp_path / "selector").mkdir()
    (tmp_path / "selector" / "predictions.json").write_text(json.dumps({"a": "darken"}))
    coach = distill.Coach.from_config(T.Config(out_dir=str(tmp_path), coach="selector"), records)
    assert "misses 1 of 2 promptable" in capsys.readouterr().out
    c = Counter()
    assert coach.choose(records[1], c) == "raw" and c["fallback/selector_miss"] == 1
    with pytest.raises(SystemExit, match="run --stage=selector first"):
        distill.Coach.from_config(T.Config(out_dir=str(tmp_path / "none"), coach="selector"), records)
