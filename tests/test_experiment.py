"""experiment.py's options, arms and table (the runs themselves are the experiment, not a test)."""
import json
import os

import pytest

import experiment
import train


def test_quick_preset_and_explicit_flags():
    o = experiment.parse(["--preset=quick", "--rl_steps=30"])
    assert (o["seeds"], o["arms"], o["rl_steps"], o["out"]) == ("0", "grpo,visioncoach", "30", "runs/experiment_quick")
    full = experiment.parse([])
    assert full["seeds"] == "0,1,2" and full["arms"].split(",") == list(experiment.ARMS)
    with pytest.raises(SystemExit, match="expected one of"):
        experiment.parse(["--preset=huge"])
    with pytest.raises(SystemExit, match="unknown option"):
        experiment.parse(["--step=3"])


def test_every_arm_is_a_valid_train_config():
    for arm, flags in experiment.ARMS.items():
        cfg = train.parse_args(["--stage=rl", *flags])
        assert cfg.coach in ("none", "selector", "random"), arm
    assert train.parse_args(experiment.ARMS["sd_raw"]).sd_condition == "raw"
    assert train.parse_args(experiment.ARMS["prompts_no_sd"]).alpha == 0


def test_table_is_mean_and_std_over_seeds():
    rows = {"grpo": [{m: 1.0 for m in experiment.METRICS}, {m: 3.0 for m in experiment.METRICS}]}
    lines = experiment.table(rows).splitlines()
    assert lines[0].startswith("| arm | seeds | mAM |")
    assert lines[2].startswith("| grpo | 2 | 2.00 ± 1.41 |")


def test_coach_table_sums_over_steps_and_seeds(tmp_path):
    dirs = []
    for seed, rows in enumerate([
            [{"coach/hard_share": 0.5, "coach/chosen/darken": 2, "coach/raw_sum/darken": 1.0, "coach/prompted_sum/darken": 3.0,
              "coach/chosen/spotlight": 1, "coach/raw_sum/spotlight": 0.0, "coach/prompted_sum/spotlight": 1.5}],
            [{"coach/hard_share": 1.0, "coach/chosen/darken": 2, "coach/raw_sum/darken": 1.0, "coach/prompted_sum/darken": 0.0}]]):
        d = tmp_path / f"visioncoach_s{seed}"
        os.makedirs(d / "rl")
        (d / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(str(d))
    lines = experiment.coach_table({"visioncoach": dirs}).splitlines()
    # darken: 4 groups, raw 2.0 / 4 = 0.5, prompted 3.0 / 4 = 0.75, +50%; spotlight's raw mean is 0: no lift
    assert lines[2] == "| visioncoach | 0.75 | darken | 4 | 0.500 | 0.750 | +50.0% |"
    assert lines[3] == "| visioncoach | 0.75 | spotlight | 1 | 0.000 | 1.500 | - |"


def test_the_no_perception_row_is_the_same_sft_from_a_random_tiny_model(tmp_path, monkeypatch):
    """One extra SFT (data and SFT stages with --base_model=tiny, in its own folder) evaluated as its
    own row; the quick preset leaves it out."""
    cmds = []
    monkeypatch.setattr(experiment, "run", lambda cmd: cmds.append(cmd[1:]))
    monkeypatch.setattr(experiment, "evaluate", lambda ckpt, out, o: {"ckpt": ckpt, "out": out})
    written = []
    monkeypatch.setattr(experiment, "write", lambda o, results, out_dirs, final: written.append(results))
    base, out = str(tmp_path / "base"), str(tmp_path / "exp")
    experiment.main([f"--base={base}", f"--out={out}", "--arms=grpo", "--seeds=0"])
    assert written[-1]["sft_no_perception"] == [{"ckpt": f"{base}/no_perception/sft/last",
                                                 "out": f"{out}/sft_no_perception"}]
    none = [c for c in cmds if "--base_model=tiny" in c]
    assert none == [["train.py", f"--stage={s}", f"--out_dir={base}/no_perception", "--base_model=tiny"]
                    for s in ("data", "sft")]
    assert all("--base_model=tiny" not in c for c in cmds if f"--out_dir={base}" in c)   # the main SFT: the checkpoint
    assert experiment.parse(["--preset=quick"])["no_perception"] == "0"


def test_calibration_measures_prompts_only_where_the_coach_can_draw_them(tmp_path, monkeypatch):
    """k is chosen over every group, but the prompts' lift is measured on the hard groups RL's coach
    would prompt: a hard temporal question (no key frames) or one whose key frames hold no object
    would be re-drawn raw in RL, so prompting it here would score the hint alone."""
    box = {"red circle": [[0.1, 0.1, 0.3, 0.3]]}
    recs = [{"id": "ff_hard", "key_frames": [{"idx": 4}], "key_items": {"4": box}},
            {"id": "tg_hard", "key_frames": [], "key_items": {}},
            {"id": "empty_hard", "key_frames": [{"idx": 4}], "key_items": {"4": {}}},
            {"id": "ff_easy", "key_frames": [{"idx": 4}], "key_items": {"4": box}},
            {"id": "mcq_hard", "key_frames": [{"idx": 2}, {"idx": 6}], "key_items": {"6": box}}]
    means = [1.0, 0.5, 0.2, 2.5, 1.8]
    assert [r["id"] for r in experiment.lift_groups(recs, means, 1.9)] == ["ff_hard", "mcq_hard"]
    assert experiment.lift_groups(recs, means, 0.1) == []

    asked = []
    monkeypatch.setattr(experiment.train, "load_policy", lambda *a, **k: None)
    monkeypatch.setattr(experiment.train, "val_group_means", lambda cfg, rt, bundle, n: (recs, means))
    monkeypatch.setattr(experiment.train, "vp_group_means", lambda cfg, rt, bundle, hard, draw:
                        asked.append([r["id"] for r in hard]) or {"raw": [1.0, 1.0], "darken": [1.5, 1.0]})
    o = {"base": str(tmp_path), "out": str(tmp_path), "calibrate": "5", "extra": ""}
    result = experiment.calibrate("sft", o)
    assert asked == [["ff_hard", "mcq_hard"]]
    assert result["hard_share_at_k_used"] == 0.8 and result["hard_promptable"] == 2   # k = 1.9: four of five hard
    assert result["hard_vp_lift"] == {"raw": 0.0, "darken": 0.25}
    assert json.load(open(tmp_path / "k_calibration.json"))["hard_promptable"] == 2
    # --extra reaches the calibration as it reaches RL: at k = 1.5 three groups are hard, one promptable
    result = experiment.calibrate("sft", {**o, "extra": "--hard_k=1.5"})
    assert asked[-1] == ["ff_hard"] and result["k"] == 1.5 and result["hard_share_at_k_used"] == 0.6
