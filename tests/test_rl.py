"""The RL stage end to end on the tiny model: what trains, what stays frozen, VisionCoach's effect,
multi-process equivalence and exact resume. Rewards are replaced by a deterministic function of the
completion text, so every group has reward variance even for a random model (the reward code
itself is tested in test_rewards.py)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import grpo
import model
import prompt
import rewards
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_score_group(texts, record, ctx, cfg):
    """Reward = share of 'e' characters, answer = 1 if the text is longer than 20 characters."""
    ans = [float(len(t) > 20) for t in texts]
    total = [t.count("e") / max(1, len(t)) + a for t, a in zip(texts, ans)]
    return {"answer": ans, "total": total}


def rl_cfg(tiny_data, out, **kw):
    base = dict(stage="rl", out_dir=str(out), data_dir=tiny_data, batch_size=2, rl_steps=2, group_size=3,
                max_new_tokens=12, max_frames=6, rl_lr=5e-3, coach="none", save_every=100, sample_every=1,
                seed=1)
    base.update(kw)
    return train.Config(**base)


def run_rl(cfg, start, monkeypatch):
    monkeypatch.setattr(rewards, "score_group", fake_score_group)
    return train.stage_rl(cfg, train.setup_runtime(cfg), start)


def params(path):
    vlm, _, _ = model.load_policy(path)
    return dict(vlm.named_parameters())


def test_rl_updates_trainable_weights_and_leaves_frozen_ones(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    ck = run_rl(rl_cfg(tiny_data, tmp_path, train_vision=False), tiny_model_dir, monkeypatch)
    before, after = params(tiny_model_dir), params(ck)
    vision = [n for n in before if ".visual." in n or n.startswith("model.visual")]
    text = [n for n in before if n not in vision]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)
    assert sum(not torch.equal(before[n], after[n]) for n in text) > len(text) // 2
    rows = [l for l in open(tmp_path / "rl" / "metrics.jsonl")]
    assert len(rows) == 2 and os.path.isfile(tmp_path / "rl" / "samples.jsonl")


def test_distillation_off_equals_plain_grpo_and_on_differs(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    plain = params(run_rl(rl_cfg(tiny_data, tmp_path / "none"), tiny_model_dir, monkeypatch))
    # never hard: identical to plain GRPO
    never = params(run_rl(rl_cfg(tiny_data, tmp_path / "never", coach="fixed:darken", hard_k=-1.0),
                          tiny_model_dir, monkeypatch))
    # always hard but alpha = 0: prompted rollouts are scored, nothing is distilled
    alpha0 = params(run_rl(rl_cfg(tiny_data, tmp_path / "a0", coach="fixed:darken", hard_k=100.0, alpha=0.0),
                           tiny_model_dir, monkeypatch))
    # always hard, alpha > 0: a different update
    on = params(run_rl(rl_cfg(tiny_data, tmp_path / "on", coach="fixed:darken", hard_k=100.0, alpha=1.0),
                       tiny_model_dir, monkeypatch))
    for n in plain:
        torch.testing.assert_close(never[n], plain[n], atol=1e-7, rtol=0)
        torch.testing.assert_close(alpha0[n], plain[n], atol=1e-7, rtol=0)
    assert max((on[n] - plain[n]).abs().max().item() for n in plain) > 1e-4
    import json
    rows = lambda arm: [json.loads(l) for l in open(tmp_path / arm / "rl" / "metrics.jsonl")]  # noqa: E731
    last = rows("on")[-1]
    assert last["coach/hard_share"] == 1.0 and last["coach/kept"] >= 1 and last["sd_nll"] > 0
    # alpha weighs the loss, not the logged NLL: same first-step rollouts, same NLL, other weights
    half = params(run_rl(rl_cfg(tiny_data, tmp_path / "half", coach="fixed:darken", hard_k=100.0, alpha=0.5),
                         tiny_model_dir, monkeypatch))
    assert rows("half")[0]["sd_nll"] == rows("on")[0]["sd_nll"]
    assert max((half[n] - on[n]).abs().max().item() for n in plain) > 1e-5


def test_resume_equals_uninterrupted(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    full = params(run_rl(rl_cfg(tiny_data, tmp_path / "full", rl_steps=3, logprob_batch=2), tiny_model_dir,
                         monkeypatch))
    cfg = rl_cfg(tiny_data, tmp_path / "crash", rl_steps=3, save_every=1, logprob_batch=2)
    real = train.rl_rollouts

    def crash(cfg, rt, run, rl, step):
        if step == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(cfg, rt, run, rl, step)

    monkeypatch.setattr(train, "rl_rollouts", crash)
    with pytest.raises(KeyboardInterrupt):
        run_rl(cfg, tiny_model_dir, monkeypatch)
    monkeypatch.setattr(train, "rl_rollouts", real)
    resumed = params(run_rl(cfg, tiny_model_dir, monkeypatch))
    assert cfg.batch_prompts > 1 and cfg.logprob_batch > 1          # the batched paths, resumed bit for bit
    for n in full:
        assert torch.equal(resumed[n], full[n]), n


def metric_rows(path):
    import json
    return [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")} for l in open(path)]


def test_batched_rollouts_and_logprobs_give_the_same_run_as_one_at_a_time(tiny_data, tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    # every group hard, so the coach's prompted rollouts and the SD term are batched too; 4 prompts in
    # chunks of 3 and 1 log-prob groups
    arms = {"one": dict(batch_prompts=1, logprob_batch=1), "batched": dict(batch_prompts=4, logprob_batch=3)}
    out = {}
    for arm, kw in arms.items():
        cfg = rl_cfg(tiny_data, tmp_path / arm, batch_size=4, coach="fixed:darken", hard_k=100.0, alpha=1.0, **kw)
        out[arm] = params(run_rl(cfg, tiny_model_dir, monkeypatch))
    # the same rollouts token for token (per-prompt generators), so the same rewards, losses, gradient norms
    samples = {arm: [l for l in open(tmp_path / arm / "rl" / "samples.jsonl")] for arm in arms}
    assert samples["one"] == samples["batched"] and len(samples["one"]) == 2
    one, batched = (metric_rows(tmp_path / arm / "rl" / "metrics.jsonl") for arm in arms)
    assert one[0]["coach/kept"] >= 1 and one[0]["sd_nll"] > 0 and one[1]["kl"] > 0
    for a, b in zip(one, batched):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    # Weights: the same up to float32 summation order, which Adam's first steps (update ~ lr * sign(g))
    # amplify on the few elements whose gradient is near zero: measured 3e-5 of the elements off by
    # more than 1e-5, at most 1.3e-4 (the update itself is ~lr = 5e-3).
    diff = torch.cat([(out["batched"][n] - out["one"][n]).abs().flatten() for n in out["one"]])
    assert (diff > 1e-5).float().mean() < 1e-3 and diff.max() < 1e-3


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    import rewards, train
    from test_rl import fake_score_group
    rewards.score_group = fake_score_group
    train.main(sys.argv[1:])
""")


def test_two_processes_give_the_same_update_as_one(tiny_data, tiny_model_dir, tmp_path):
    script = tmp_path / "run_rl.py"
    script.write_text(SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    args = ["--stage=rl", f"--model={tiny_model_dir}", f"--data_dir={tiny_data}", "--batch_size=2",
            "--rl_steps=2", "--group_size=3", "--max_new_tokens=12", "--max_frames=6", "--rl_lr=5e-3",
            "--coach=fixed:darken", "--hard_k=100", "--alpha=1.0", "--device=cpu", "--seed=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"np{n}"
        # Each rank of two holds one group, so its batched log-prob forward (--logprob_batch=2, through
        # DDP) holds one group; one process runs one group per forward, so float summation, hence
        # Adam's update, matches (the batched-run test covers several groups per forward).
        per_forward = ["--logprob_batch=2"] if n == 2 else ["--logprob_batch=1"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(script), *args, *per_forward, f"--out_dir={out}"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n] = params(str(out / "rl" / "last"))
    start = params(tiny_model_dir)
    moved = max((outs[1][n] - start[n]).abs().max().item() for n in start)
    assert moved > 5e-3                                   # the update is real (lr 5e-3, two steps)
    # and the same up to float summation order, which Adam's first steps amplify on elements whose
    # gradient is near zero (as in the batched test above): on the fixed-MCQ tiny set, 1 element of
    # 2.2M off by more than 1e-5 (2.4e-5), against an update of ~lr = 5e-3
    diff = torch.cat([(outs[2][n] - outs[1][n]).abs().flatten() for n in start])
    assert (diff > 1e-5).float().mean() < 1e-4 and diff.max() < 1e-3


def test_nonfinite_updates_are_skipped_then_stop_with_a_clear_error(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    real = grpo.policy_loss
    calls = {"n": 0}

    def sometimes_nan(*a, **k):
        loss, m = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] <= 2 else loss), m   # first step's two groups: NaN

    monkeypatch.setattr(grpo, "policy_loss", sometimes_nan)
    ck = run_rl(rl_cfg(tiny_data, tmp_path / "a", rl_steps=2), tiny_model_dir, monkeypatch)
    import json
    rows = [json.loads(l) for l in open(tmp_path / "a" / "rl" / "metrics.jsonl")]
    assert rows[0]["skipped/nonfinite_update"] == 1 and "grad_norm" not in rows[0]
    assert all(torch.isfinite(p).all() for p in params(ck).values())

    monkeypatch.setattr(grpo, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("inf"), {}))
    with pytest.raises(RuntimeError, match="5 updates in a row had NaN/inf"):
        run_rl(rl_cfg(tiny_data, tmp_path / "b", rl_steps=6), tiny_model_dir, monkeypatch)


def test_prompts_over_max_prompt_tokens_are_skipped_loudly(tiny_data, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import json
    run_rl(rl_cfg(tiny_data, tmp_path, rl_steps=1, max_prompt_tokens=20), tiny_model_dir, monkeypatch)
    err = capsys.readouterr().err
    assert err.count("WARNING") == 2 and "> --max_prompt_tokens=20; skipped" in err and "--max_pixels" in err
    row = json.loads(open(tmp_path / "rl" / "metrics.jsonl").readline())
    assert row["skipped/prompt_too_long"] == 2


def test_rl_without_the_selector_stage_fails_before_loading_models(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(model, "load_policy", lambda *a, **k: pytest.fail("loaded a model first"))
    with pytest.raises(SystemExit, match="run --stage=selector first"):
        run_rl(rl_cfg(tiny_data, tmp_path, coach="selector"), str(tmp_path / "no_model"), monkeypatch)


def test_k_for_share_splits_the_group_means_at_the_quantile():
    means = [3.0, 1.0, 4.0, 2.0]
    assert train.k_for_share(means, 0.5) == 2.5                       # 1 and 2 below, 3 and 4 above
    assert train.k_for_share(means, 0.25) == 1.5 and train.k_for_share(means, 0.75) == 3.5
    assert train.k_for_share(means, 0.0) == 1.5 and train.k_for_share(means, 1.0) == 3.5  # at least one each side
    ten = [float(v) for v in range(10)]
    k = train.k_for_share(ten, 0.4)
    assert sum(m < k for m in ten) == 4


def test_val_group_means_are_the_rollout_rewards_when_rl_starts(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    """One mean per validation prompt, the fake reward of G seeded rollouts: the same numbers on a
    second call, and within the fake reward's range."""
    monkeypatch.setattr(rewards, "score_group", fake_score_group)
    cfg = rl_cfg(tiny_data, tmp_path)
    rt = train.setup_runtime(cfg)
    bundle = train.load_policy(cfg, rt, tiny_model_dir, trainable=False)
    records, means = train.val_group_means(cfg, rt, bundle, 5)
    n_val = len(json.load(open(os.path.join(tiny_data, "val.json"))))
    assert len(means) == len(records) == min(5, n_val) and all(0.0 <= m <= 2.0 for m in means)
    assert train.val_group_means(cfg, rt, bundle, 5)[1] == means
    by_vp = train.vp_group_means(cfg, rt, bundle, records)
    assert list(by_vp) == list(prompt.VISUAL_PROMPTS) and by_vp["raw"] == means
    assert all(len(v) == len(records) for v in by_vp.values())
    assert len({tuple(v) for v in by_vp.values()}) > 1   # prompted inputs and draws differ from raw
    fresh = train.vp_group_means(cfg, rt, bundle, records, ("raw",), draw="lift")["raw"]
    assert fresh != means                                 # another draw: other rollouts


def test_adv_std_false_centres_the_advantages_without_dividing(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    for scale in (True, False):
        seen = []                                                             # each scored group's totals

        def score(*args):
            table = fake_score_group(*args)
            seen.append(table["total"])
            return table

        monkeypatch.setattr(rewards, "score_group", score)
        cfg = rl_cfg(tiny_data, tmp_path / str(scale), rl_steps=1, adv_std=scale)
        train.stage_rl(cfg, train.setup_runtime(cfg), tiny_model_dir)
        totals = torch.tensor(seen)                                          # (batch_size, G)
        centred = totals - totals.mean(-1, keepdim=True)
        want = centred / (totals.std(-1, unbiased=False, keepdim=True) + 1e-4) if scale else centred
        row = json.loads(open(tmp_path / str(scale) / "rl" / "metrics.jsonl").readline())
        assert totals.shape == (2, 3) and totals.std(-1).min() > 0          # both groups carry a signal
        assert abs(row["adv_std"] - want.std(unbiased=False).item()) < 1e-5
