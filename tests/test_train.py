"""train.py and config.py: overrides and choices checked at parse time, --help, SFT lowers the loss,
the checkpoint layout, a save that survives a kill at any instant, exact resume, trackers, torchrun."""
import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from accelerate.tracking import GeneralTracker
import transformers

import config
import data
import metrics
import model
import prompt
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_are_type_checked():
    cfg = train.parse_args(["--lr=0.5", "--train_vision=false", "--stage=sft", "--group_size=3",
                            "--coach=fixed:red_circle", "--vp_darken_factor=0.5"])
    assert (cfg.lr, cfg.train_vision, cfg.stage, cfg.group_size) == (0.5, False, "sft", 3)
    assert (cfg.coach, config.vp_config(cfg).darken_factor) == ("fixed:red_circle", 0.5)
    assert train.parse_args(["--reward_rules=released"]).reward_rules == "released"
    for bad in (["--lr=fast"], ["--nope=1"], ["lr=1"], ["--train_vision=maybe"], ["--group_size=2.5"],
                ["--ratio=tokens"], ["--stage=perception"], ["--sd_condition=both"], ["--dtype=fp8"],
                ["--reward_identity=fuzzy"], ["--benchmark=videomme"], ["--difficulty=1.5"],
                ["--reward_rules=release"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


@pytest.mark.parametrize("value", ["fixed:glitter", "fixed:", "fixed", "sometimes", "Selector"])
def test_bad_coach_fails_at_parse_time_naming_the_choices(value):
    with pytest.raises(SystemExit, match="fixed:darken"):
        train.parse_args([f"--coach={value}"])


def test_bad_coach_stops_the_main_job_before_any_stage(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--coach=fixed:glitter", f"--out_dir={tmp_path / 'out'}",
                        f"--data_dir={tmp_path / 'data'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--coach='fixed:glitter'" in r.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_every_field_has_a_comment_and_help_lists_it(capsys):
    comments = config.field_help()
    fields = [f.name for f in dataclasses.fields(train.Config)]
    assert set(comments) == set(fields) and all(comments.values())
    with pytest.raises(SystemExit) as done:
        train.parse_args(["--lr=0.1", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--hard_k=1.9 " in text and comments["hard_k"] in text and "--lr=0.1 " in text
    assert all(f"--{name}=" in text for name in fields)


def test_derived_settings_follow_the_config():
    cfg = train.Config(fps=1.0, min_frames=2, max_frames=5, group_size=3, max_new_tokens=7, vp_digit_scale=0,
                       rl_steps=60, rl_warmup_share=0.05)
    assert config.frames(cfg) == data.FrameConfig(1.0, 2, 5)
    assert config.sampling(cfg) == config.grpo.Sampling(3, 7, cfg.temperature, cfg.top_p)
    assert config.sampling(cfg, 1).n == 1
    assert config.vp_config(cfg).digit_scale is None                 # 0 -> automatic size
    assert config.rl_warmup(cfg) == 3 and config.rl_warmup(train.Config(rl_steps=2)) == 1
    assert train.Config().fps == data.FrameConfig().fps             # defaults read from the library, not copied


def sft_cfg(tiny_data, out, **kw):
    base = dict(stage="sft", out_dir=str(out), data_dir=tiny_data, batch_size=4, sft_epochs=1.0, lr=3e-3,
                sft_warmup=1, save_every=100, max_frames=8, sft_vstar_turns=0)
    base.update(kw)
    return train.Config(**base)


def fixed_batch_loss(path, tiny_data, cfg):
    vlm, tok, vision = model.load_policy(path)
    recs = data.load_records(os.path.join(tiny_data, "train.json"))[:4]
    with torch.no_grad():
        return train.sft_loss(model.LogProbModule(vlm), [train.sft_example(r, tok, vision, cfg) for r in recs]).item()


def newest(out, stage="sft"):
    """The newest complete checkpoint folder of a stage."""
    return train.checkpoints(os.path.join(out, stage))[-1][1]


def test_sft_steps_lower_the_loss(tiny_data, tiny_model_dir, tmp_path):
    cfg = sft_cfg(tiny_data, tmp_path, sft_epochs=2.0)
    rt = train.setup_runtime(cfg)
    before = fixed_batch_loss(tiny_model_dir, tiny_data, cfg)
    ckpt = train.stage_sft(cfg, rt, tiny_model_dir)
    after = fixed_batch_loss(ckpt, tiny_data, cfg)
    assert after < before - 0.5, (before, after)
    rows = [json.loads(l) for l in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    state = train.load_trainer_state(newest(tmp_path))
    assert state["done"] and state["step"] == 6


def test_claim_pointer_aid_adds_to_the_nll_and_teaches_head_0_to_look(tiny_data, tiny_model_dir, tmp_path):
    """--sft_attend_weight: the loss is the NLL plus weight x the claim pointer's -log mass / rows; its
    gradient moves head 0 of the chosen layer onto the claims' cells (plain SFT does not), and the
    SFT stage logs it. Without eager attention the flag is refused before anything runs."""
    vlm, tok, vision = model.load_policy(tiny_model_dir, attn_implementation="eager")
    cfg = sft_cfg(tiny_data, tmp_path, sft_attend_weight=2.0, sft_attend_layer=1, attn_implementation="eager",
                  max_frames=4)
    recs = [r for r in data.load_records(os.path.join(tiny_data, "train.json")) if r["key_frames"]][:3]
    batch = [train.sft_example(r, tok, vision, cfg) for r in recs]
    assert all(len(p.frame_times) == len(p.image_grid_thw) for p, _ in batch)
    policy = model.LogProbModule(vlm)
    pointer = train.claim_pointer(cfg, SimpleNamespace(tokenizer=tok, vision=vision), len(batch))
    with torch.no_grad():
        plain, both = train.sft_loss(policy, batch), train.sft_loss(policy, batch, pointer=pointer)
    aid, n, nll = pointer.log[0]
    assert nll == pytest.approx(plain.item(), rel=1e-5)
    assert n == len(batch) and aid > 1.0                          # every record's trace has claims
    assert both.item() == pytest.approx(plain.item() + 2.0 * aid / len(batch), rel=1e-5)

    def aid_after(weight, steps=5):
        m = copy.deepcopy(vlm)
        pol, opt = model.LogProbModule(m), torch.optim.Adam(m.parameters(), lr=3e-3)
        ptr = dataclasses.replace(pointer, weight=weight, log=[])
        for _ in range(steps):
            opt.zero_grad()
            train.sft_loss(pol, batch, pointer=ptr).backward()
            opt.step()
        return ptr.log[-1][0] / len(batch)

    pointed, plain_sft = aid_after(20.0), aid_after(0.0)
    assert pointed < aid / len(batch) - 1.0 and pointed < plain_sft - 1.0, (aid / len(batch), pointed, plain_sft)
    cfg = dataclasses.replace(cfg, sft_epochs=0.34)
    train.stage_sft(cfg, train.setup_runtime(cfg), tiny_model_dir)
    rows = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(rows) == 1 and rows[0]["attend_nll"] > 1.0 and 0 < rows[0]["nll"] < rows[0]["loss"]
    with pytest.raises(SystemExit, match="eager"):
        config.parse_args(["--sft_attend_weight=1"])


def test_length_pieces_sort_by_length_and_cut():
    batch = [("p" * n, "t" * m) for n, m in ((5, 1), (2, 2), (9, 0), (3, 0), (1, 1))]   # lengths 6 4 9 3 2
    assert train.length_pieces(batch, 2) == [[batch[4], batch[3]], [batch[1], batch[0]], [batch[2]]]
    assert train.length_pieces(batch, 0) == [batch] == train.length_pieces(batch, 5)
    # a rank that skipped samples runs the pieces a full micro-batch would: empty ones at the end
    assert train.length_pieces(batch[:3], 2, full=6) == [[batch[1], batch[0]], [batch[2]], []]
    assert train.length_pieces([], 4, full=8) == [[], []] and train.length_pieces([], 0, full=8) == [[]]


def test_sft_in_length_sorted_pieces_takes_the_whole_batchs_gradient(tiny_data, tiny_model_dir, tmp_path):
    """A batch run as length-sorted pieces (one backward each, each piece's NLL over the whole
    batch's token count) has the whole batch's loss and gradient; sft_step runs it that way."""
    vlm, tok, vision = model.load_policy(tiny_model_dir)
    policy, cfg = model.LogProbModule(vlm), sft_cfg(tiny_data, tmp_path)
    recs = data.load_records(os.path.join(tiny_data, "train.json"))[:5]
    batch = [train.sft_example(r, tok, vision, cfg) for r in recs]
    assert len({len(p) + len(t) for p, t in batch}) > 1                  # lengths differ: padding to save

    def grads(size):
        vlm.zero_grad()
        n, total = sum(len(t) for _, t in batch), 0.0
        for piece in train.length_pieces(batch, size):
            loss = train.sft_loss(policy, piece, n)
            loss.backward()
            total += loss.item()
        return total, torch.cat([q.grad.flatten() for q in vlm.parameters() if q.grad is not None])

    (whole, g0), (pieces, g1) = grads(0), grads(2)
    assert pieces == pytest.approx(whole, abs=1e-5)
    assert (g1 - g0).abs().max() < 1e-5 * g0.abs().max() and g0.abs().max() > 0
    wrong = sum(train.sft_loss(policy, piece).item() for piece in train.length_pieces(batch, 2))
    assert abs(wrong - whole) > 0.1                        # each piece's own token mean would not add up
    logged = []
    for size in (0, 2):                                    # the SFT stage: the same first-step loss either way
        cfg = sft_cfg(tiny_data, tmp_path / str(size), sft_epochs=0.4, sft_forward_batch=size)
        train.stage_sft(cfg, train.setup_runtime(cfg), tiny_model_dir)
        logged.append(json.loads(open(tmp_path / str(size) / "sft" / "metrics.jsonl").readline())["loss"])
    assert logged[1] == pytest.approx(logged[0], abs=1e-5)


def test_vstar_chain_turns_join_sft_with_their_history(tiny_data, tiny_policy):
    """Every V-STAR turn becomes an SFT record: the first question, the gold answers and questions
    before it as history, its own gold completion as the target; the history's boxes and the
    target's are in pixels of the frame the model sees (here 56 px, half the video's 112)."""
    path = os.path.join(tiny_data, "vstar_train.json")
    samples = metrics.load_vstar(path)
    recs = train.vstar_chain_records(path, 10_000, seed=0)
    assert len(recs) == 5 * len(samples) == len({r["id"] for r in recs})
    some = train.vstar_chain_records(path, 7, seed=0)
    assert len(some) == 7 and some == train.vstar_chain_records(path, 7, seed=0)
    assert {r["id"] for r in some} != {r["id"] for r in train.vstar_chain_records(path, 7, seed=1)}
    s = samples[0]
    gold = metrics.vstar_gold_completions(s)
    rec = next(r for r in recs if r["id"] == f"{s.vid}:where1")
    assert rec["question"] == s.question and rec["reasoning_process"] == gold["where1"]
    assert rec["history"] == [(gold["what"], s.temporal_question), (gold["when1"], s.spatial_question)]
    when2 = next(r for r in recs if r["id"] == f"{s.vid}:when2")
    assert when2["history"] == [(gold["what"], s.spatial_question_2), (gold["where2"], s.temporal_question)]

    vlm, tok, vision = tiny_policy
    cfg = train.Config(max_frames=4, max_pixels=56 * 56)
    inputs, target = train.sft_example(when2, tok, vision, cfg)
    assert inputs.frame_size == (56, 56)
    half = lambda text: data.trace_to_frame_pixels(text, (112, 112), (56, 56), "test")  # noqa: E731
    prompt_text = tok.decode(inputs.input_ids)
    assert half(gold["where2"]) in prompt_text and gold["where2"] not in prompt_text
    assert prompt_text.index(s.spatial_question_2) < prompt_text.index(half(gold["where2"])) \
        < prompt_text.rindex(s.temporal_question)
    assert tok.decode(target) == half(gold["when2"]) + data.IM_END


def test_sft_visual_prompts_are_drawn_on_a_share_of_records(tiny_data, tiny_policy):
    """--sft_vp_share: the chosen records are shown with their prompt drawn on the key frames and
    its hint after the question, the target unchanged; the choice depends on (seed, id) only."""
    recs = data.load_records(os.path.join(tiny_data, "train.json"))
    keyed = [r for r in recs if r["key_frames"]]
    assert all(train.sft_visual_prompt(r, train.Config(sft_vp_share=0.0)) == "raw" for r in recs)
    every = train.Config(sft_vp_share=1.0, max_frames=4)
    chosen = [train.sft_visual_prompt(r, every) for r in keyed]
    assert "raw" not in chosen and chosen == [train.sft_visual_prompt(r, every) for r in keyed]
    assert all(train.sft_visual_prompt(r, every) == "raw" for r in recs if not r["key_frames"])
    vlm, tok, vision = tiny_policy
    rec, vp = keyed[0], chosen[0]
    raw_in, raw_target = train.sft_example(rec, tok, vision, train.Config(sft_vp_share=0.0, max_frames=4))
    vp_in, vp_target = train.sft_example(rec, tok, vision, every)
    assert torch.equal(raw_target, vp_target)
    assert prompt.HINTS[vp] in tok.decode(vp_in.input_ids) and prompt.HINTS[vp] not in tok.decode(raw_in.input_ids)
    assert not torch.equal(raw_in.pixel_values, vp_in.pixel_values)


def test_sft_set_adds_the_chain_turns_only_where_asked(tiny_data, tmp_path):
    cfg = sft_cfg(tiny_data, tmp_path, sft_vstar_turns=9)
    recs = train.sft_records(cfg)
    assert len(recs) == 12 + 9 and sum(r["task"] == "V-STAR chain" for r in recs) == 9
    assert len(train.sft_records(dataclasses.replace(cfg, sft_vstar_turns=0))) == 12
    real = dataclasses.replace(cfg, train_json=os.path.join(tiny_data, "train.json"))
    assert train.vstar_chain_file(real) is None                        # real data: only an explicit --sft_vstar
    with pytest.raises(SystemExit, match="vstar_train.json not found"):
        train.sft_records(dataclasses.replace(cfg, data_dir=str(tmp_path), train_json=real.train_json,
                                              sft_vstar=str(tmp_path / "vstar_train.json")))


def short_cfg(tiny_data, out, **kw):
    """3 SFT steps of 2 samples and 4 frames, a checkpoint after every step, the newest 2 kept."""
    return sft_cfg(tiny_data, out, **{**dict(batch_size=2, max_frames=4, sft_epochs=0.5, save_every=1,
                                             keep_checkpoints=2), **kw})


@pytest.fixture(scope="module")
def full_sft(tiny_data, tiny_model_dir, tmp_path_factory):
    """An uninterrupted short_cfg run. -> its out_dir."""
    out = tmp_path_factory.mktemp("full_sft")
    cfg = short_cfg(tiny_data, out)
    train.stage_sft(cfg, train.setup_runtime(cfg), tiny_model_dir)
    return out


def same_weights(a, b):
    a, b = model.load_policy(str(a))[0], model.load_policy(str(b))[0]
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_layout_model_folder_holds_the_model_only_and_old_checkpoints_go(full_sft):
    folder = full_sft / "sft"
    assert sorted(os.listdir(folder)) == ["checkpoint-2", "checkpoint-3", "last", "metrics.jsonl"]
    assert os.readlink(folder / "last") == os.path.join("checkpoint-3", "model")
    assert sorted(os.listdir(folder / "checkpoint-3")) == ["model", "trainer_state.pt"]
    assert sorted(os.listdir(folder / "last")) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                  "model.safetensors", "preprocessor_config.json", "tokenizer.json",
                                                  "tokenizer_config.json"]
    assert train.load_trainer_state(str(folder / "checkpoint-2"))["step"] == 2


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_data, tiny_model_dir, full_sft, tmp_path, monkeypatch):
    crash = short_cfg(tiny_data, tmp_path, save_every=2)
    rt = train.setup_runtime(crash)
    real_step = train.sft_step

    def crashing_step(cfg, rt, run, records, step):
        if step == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_step(cfg, rt, run, records, step)

    monkeypatch.setattr(train, "sft_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train.stage_sft(crash, rt, tiny_model_dir)
    assert train.load_trainer_state(newest(tmp_path))["step"] == 2
    monkeypatch.setattr(train, "sft_step", real_step)
    train.stage_sft(crash, rt, tiny_model_dir)                       # resumes at step 2

    losses = lambda p: [json.loads(l)["loss"] for l in open(p / "sft" / "metrics.jsonl")]  # noqa: E731
    assert losses(tmp_path)[-1] == pytest.approx(losses(full_sft)[-1], abs=1e-6)  # step 3, after the resume
    same_weights(full_sft / "sft" / "last", tmp_path / "sft" / "last")


class Killed(BaseException):
    """A kill: nothing in the save may catch it."""


# Every filesystem operation a save makes, as a name on its module: a kill is injected before each one.
FS_OPS = [(os, "replace"), (os, "rename"), (os, "remove"), (os, "unlink"), (os, "rmdir"), (os, "symlink"),
          (os, "mkdir"), (os, "makedirs"), (os, "fsync"), (shutil, "rmtree"), (torch, "save")]


def kill_at(monkeypatch, i):
    """Patch FS_OPS so that operation number i (0-based) raises Killed. -> the list of calls made."""
    calls = []
    for mod, name in FS_OPS:
        real = getattr(mod, name)

        def op(*a, _real=real, _name=name, **k):
            calls.append(_name)
            if len(calls) - 1 == i:
                raise Killed(f"killed before {_name} (operation {i})")
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, op)
    return calls


def test_a_save_killed_before_any_filesystem_operation_resumes_from_a_complete_checkpoint(tiny_policy, tmp_path,
                                                                                         monkeypatch):
    """Checkpoints 1 and 2 exist (keep 2); the save of step 3 (other weights) is killed before each of
    its filesystem operations in turn. Each time, recovery finds a complete newest checkpoint: step 2
    with the old weights or step 3 with the new ones, last points at it, no leftovers stay, and the
    next save works (today's code lost both copies or failed every later save)."""
    from safetensors import safe_open
    vlm, tok, vision = tiny_policy
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    weights = {s: {k: (v + s if k == name else v) for k, v in vlm.state_dict().items()} for s in (1, 2, 3, 4)}
    base = tmp_path / "base"
    for s in (1, 2):
        train.save_checkpoint(str(base), s, vlm, tok, vision, {"step": s}, keep=2, state_dict=weights[s])
    count = shutil.copytree(base, tmp_path / "count", copy_function=os.link, symlinks=True)
    calls = kill_at(monkeypatch, -1)                                # count the operations of one whole save
    train.save_checkpoint(str(count), 3, vlm, tok, vision, {"step": 3}, keep=2, state_dict=weights[3])
    monkeypatch.undo()
    assert len(calls) > 10 and {"replace", "symlink", "fsync", "save"} <= set(calls), calls
    outcomes = []
    for i in range(len(calls)):
        # hard links: a save never writes into an existing file
        folder = shutil.copytree(base, tmp_path / f"kill{i}", copy_function=os.link, symlinks=True)
        kill_at(monkeypatch, i)
        with pytest.raises(Killed):
            train.save_checkpoint(str(folder), 3, vlm, tok, vision, {"step": 3}, keep=2, state_dict=weights[3])
        monkeypatch.undo()
        ckpt = train.recover(str(folder))
        step = int(os.path.basename(ckpt).split("-")[1])
        outcomes.append(step)
        assert step in (2, 3) and train.load_trainer_state(ckpt)["step"] == step, i
        assert os.path.realpath(folder / "last") == os.path.join(os.path.realpath(ckpt), "model"), i
        with safe_open(os.path.join(folder, "last", "model.safetensors"), "pt") as f:   # the hub's key names
            assert torch.equal(f.get_tensor(name.replace("language_model.", "")), weights[step][name]), i
        assert not [n for n in os.listdir(folder) if n.endswith((".tmp", ".del"))], (i, os.listdir(folder))
        train.save_checkpoint(str(folder), 4, vlm, tok, vision, {"step": 4}, keep=2, state_dict=weights[4])
        assert [s for s, _ in train.checkpoints(str(folder))] == [step, 4], i
    assert outcomes[0] == 2 and outcomes[-1] == 3 and outcomes == sorted(outcomes)   # one commit point


@pytest.mark.parametrize("where", ["before_commit", "after_commit"])
def test_a_kill_inside_a_save_resumes_to_the_uninterrupted_weights(tiny_data, tiny_model_dir, full_sft, tmp_path,
                                                                 monkeypatch, where):
    """A run killed in the save of step 2, just before its rename (resumes from step 1) or just after
    (resumes from step 2), ends with the weights of the uninterrupted run. With the test above (every
    kill point leaves one of those two states) this covers a kill anywhere in a save."""
    cfg = short_cfg(tiny_data, tmp_path)
    rt = train.setup_runtime(cfg)
    target = "fsync_tree" if where == "before_commit" else "point_last"
    real = getattr(train, target)

    def kill(folder, *a):
        if folder.endswith("checkpoint-2.tmp") or (a and a[0].endswith("checkpoint-2")):
            raise Killed(where)
        return real(folder, *a)

    monkeypatch.setattr(train, target, kill)
    with pytest.raises(Killed):
        train.stage_sft(cfg, rt, tiny_model_dir)
    monkeypatch.undo()
    ckpt, state = train.resume_point(cfg, rt, "sft")
    assert state["step"] == (1 if where == "before_commit" else 2)
    train.stage_sft(cfg, rt, tiny_model_dir)
    same_weights(full_sft / "sft" / "last", tmp_path / "sft" / "last")
    assert train.load_trainer_state(newest(tmp_path))["done"]


def test_a_shorter_schedule_on_resume_is_refused_clearly(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    cfg = short_cfg(tiny_data, tmp_path)                                       # 3 steps; a checkpoint at each
    rt = train.setup_runtime(cfg)
    real_step = train.sft_step
    monkeypatch.setattr(train, "sft_step", lambda c, r, run, recs, step: (_ for _ in ()).throw(KeyboardInterrupt)
                        if step == 2 else real_step(c, r, run, recs, step))
    with pytest.raises(KeyboardInterrupt):
        train.stage_sft(cfg, rt, tiny_model_dir)
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"checkpoint-2 has done 2 steps, but this config's schedule has 1 in all"):
        train.stage_sft(dataclasses.replace(cfg, sft_epochs=1 / 6), rt, tiny_model_dir)
    with pytest.raises(SystemExit, match=r"--resume=false, but .* holds checkpoints"):
        train.stage_sft(dataclasses.replace(cfg, resume=False), rt, tiny_model_dir)


class Planted:
    """Unpickling this object calls os.mkdir(path): what a planted trainer_state.pt could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_planted_pickle_in_the_trainer_state_is_refused(tiny_data, tiny_model_dir, full_sft, tmp_path):
    folder = shutil.copytree(full_sft / "sft", tmp_path / "run" / "sft", symlinks=True)
    marker = tmp_path / "code_ran"
    torch.save({"step": 3, "x": Planted(str(marker))}, folder / "checkpoint-3" / "trainer_state.pt")
    cfg = short_cfg(tiny_data, tmp_path / "run")
    with pytest.raises(SystemExit, match=r"checkpoint-3/trainer_state.pt: refused"):
        train.stage_sft(cfg, train.setup_runtime(cfg), tiny_model_dir)
    assert not marker.exists()
    assert train.load_trainer_state(str(folder / "checkpoint-2"))["optimizer"]["state"]   # the real state loads


def test_frozen_vision_tower_stays_frozen(tiny_data, tiny_model_dir, tmp_path):
    cfg = sft_cfg(tiny_data, tmp_path, train_vision=False, sft_epochs=0.5)
    ckpt = train.stage_sft(cfg, train.setup_runtime(cfg), tiny_model_dir)
    a, _, _ = model.load_policy(tiny_model_dir)
    b, _, _ = model.load_policy(ckpt)
    va, vb = dict(a.model.visual.named_parameters()), dict(b.model.visual.named_parameters())
    assert all(torch.equal(va[n], vb[n]) for n in va)
    assert not torch.equal(a.model.language_model.layers[0].mlp.up_proj.weight,
                           b.model.language_model.layers[0].mlp.up_proj.weight)


def test_two_process_torchrun_sft(tiny_data, tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--stage=sft", f"--model={tiny_model_dir}", f"--data_dir={tiny_data}", f"--out_dir={tmp_path}",
           "--batch_size=4", "--sft_epochs=0.7", "--max_frames=8", "--device=cpu", "--sft_vstar_turns=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = train.load_trainer_state(newest(tmp_path))
    assert state["done"] and state["step"] == 2


class ListTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is given (stands in for tensorboard / wandb)."""
    name, requires_logging_directory = "list", False

    def __init__(self):
        super().__init__()
        self.rows, self.config, self.finished = [], None, False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.rows.append((step, values))

    def finish(self):
        self.finished = True


def test_report_to_sends_each_step_to_the_trackers(tiny_data, tiny_model_dir, tmp_path):
    rt = train.setup_runtime(short_cfg(tiny_data, tmp_path))
    cfg = short_cfg(tiny_data, tmp_path, report_to="wandb")     # built directly: the package check is parse_args'
    tracker = ListTracker()
    rt.accelerator.log_with = [tracker]                          # accelerate takes tracker objects there
    train.stage_sft(cfg, rt, tiny_model_dir)
    rows = [json.loads(l) for l in open(tmp_path / "sft" / "metrics.jsonl")]
    assert [step for step, _ in tracker.rows] == [1, 2, 3]
    assert [v["sft/loss"] for _, v in tracker.rows] == [r["loss"] for r in rows]
    assert tracker.config["lr"] == cfg.lr and tracker.finished and rt.accelerator.trackers == []


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_report_to_a_missing_package_says_what_to_install(package):
    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed")
    with pytest.raises(SystemExit, match=f"pip install {package}"):
        train.parse_args([f"--report_to={package}"])
    assert train.parse_args(["--report_to=none"]).report_to == "none"


def test_tensorboard_gets_the_metrics(tiny_data, tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = train.parse_args(["--stage=sft", f"--out_dir={tmp_path}", f"--data_dir={tiny_data}", "--batch_size=2",
                            "--max_frames=4", "--sft_epochs=0.34", "--report_to=tensorboard", "--sft_vstar_turns=0"])
    train.stage_sft(cfg, train.setup_runtime(cfg), tiny_model_dir)
    runs = EventAccumulator(str(tmp_path / "visioncoach"))
    runs.Reload()
    assert [e.step for e in runs.Scalars("sft/loss")] == [1, 2]


def test_bf16_step_at_paper_lr_moves_fp32_master_weights(tiny_data, tiny_model_dir, tmp_path):
    # one SFT step at the paper's lr 1e-6 in bf16 compute: bf16 parameters would drop nearly every
    # update (their resolution is ~4e-3 relative); fp32 masters under autocast keep them
    cfg = sft_cfg(tiny_data, tmp_path, dtype="bfloat16", lr=1e-6, sft_epochs=0.34)
    ckpt = train.stage_sft(cfg, train.setup_runtime(cfg), tiny_model_dir)
    assert train.load_trainer_state(newest(cfg.out_dir))["step"] == 1
    a, b = (safetensors.torch.load_file(os.path.join(d, "model.safetensors")) for d in (tiny_model_dir, ckpt))
    assert {t.dtype for t in b.values()} == {torch.float32}        # the masters were saved, not a bf16 copy
    changed = sum(int((a[k] != b[k]).sum()) for k in a) / sum(t.numel() for t in a.values())
    assert changed > 0.99, changed


def test_sft_checkpoint_keeps_its_starts_question_layout(tiny_data, tiny_model_dir, tmp_path):
    start = str(tmp_path / "start")
    shutil.copytree(tiny_model_dir, start)
    vision = model.VisionProcessor.load(start)
    vision.question_at = "both"
    vision.save(start)
    cfg = sft_cfg(tiny_data, tmp_path / "run", sft_epochs=0.34)
    ckpt = train.stage_sft(cfg, train.setup_runtime(cfg), start)
    assert model.VisionProcessor.load(ckpt).question_at == "both"      # RL and eval will prompt as SFT did
    assert model.VisionProcessor.load(tiny_model_dir).question_at == "after"


SNAPSHOT_AT_STEP_2 = """import shutil
import sys
sys.path.insert(0, {root!r})
import train
real_end_step = train.end_step


def end_step(cfg, rt, run, step, total, metrics, extra_state=None):
    real_end_step(cfg, rt, run, step, total, metrics, extra_state)
    if step == 2 and rt.main:      # what a crash during step 3 would leave behind
        shutil.copytree(train.stage_dir(cfg, run.name), {snapshot!r}, symlinks=True)  # last stays a link


train.end_step = end_step
train.main(sys.argv[1:])
"""


def zero3_launch(script, tiny_data, tiny_model_dir, out):
    """accelerate launch of configs/zero3.yaml with 2 CPU processes (DeepSpeed's CPU accelerator, gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/zero3.yaml",
           "--num_processes=2", "--mixed_precision=no", script, "--stage=sft", f"--model={tiny_model_dir}",
           f"--data_dir={tiny_data}", f"--out_dir={out}", "--batch_size=4", "--sft_epochs=1", "--save_every=2",
           "--max_frames=8", "--dtype=float32", "--sft_vstar_turns=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_zero3_two_processes_train_save_a_loadable_checkpoint_and_resume(tiny_data, tiny_model_dir, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (setup.sh --deepspeed)")
    script = tmp_path / "snapshot.py"
    script.write_text(SNAPSHOT_AT_STEP_2.format(root=ROOT, snapshot=str(tmp_path / "crash" / "sft")))
    full = zero3_launch(str(script), tiny_data, tiny_model_dir, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    shards = lambda d: sorted(os.listdir(d / "sft" / "optimizer_shards"))  # noqa: E731
    assert shards(tmp_path / "crash") == ["step2.rank0.pt", "step2.rank1.pt"]   # one per rank, kept beside
    assert shards(tmp_path / "full") == ["step3.rank0.pt", "step3.rank1.pt"]    # older ones dropped
    last = tmp_path / "crash" / "sft" / "last"
    assert train.load_trainer_state(newest(tmp_path / "crash"))["step"] == 2
    resumed = zero3_launch("train.py", tiny_data, tiny_model_dir, tmp_path / "crash")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stdout
    # the gathered save: every weight has its full shape (rank 0 alone would write empty partitions)
    base, _, _ = model.load_policy(tiny_model_dir)
    a, _, _ = model.load_policy(str(tmp_path / "full" / "sft" / "last"))
    b, _, _ = model.load_policy(str(last))
    for (n, p), (_, q), (_, r) in zip(base.named_parameters(), a.named_parameters(), b.named_parameters()):
        assert p.shape == q.shape == r.shape, n
        torch.testing.assert_close(q, r, atol=1e-6, rtol=0, msg=n)    # resumed = uninterrupted
    assert not torch.equal(base.model.language_model.layers[0].mlp.up_proj.weight,
                           a.model.language_model.layers[0].mlp.up_proj.weight)
    losses = lambda d: [json.loads(l)["loss"] for l in open(d / "sft" / "metrics.jsonl")]  # noqa: E731
    assert len(losses(tmp_path / "crash")) == 3
    assert losses(tmp_path / "crash")[-1] == pytest.approx(losses(tmp_path / "full")[-1], abs=1e-6)


FSDP2_SCRIPT = """import copy
import os
import sys
from types import SimpleNamespace
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import config, data, model, train

dist.init_process_group("gloo")
rank = dist.get_rank()
model_dir, data_dir, out = sys.argv[1:4]
vlm, tok, vision = model.load_policy(model_dir)
rec = data.load_records(os.path.join(data_dir, "train.json"))[0]
inputs = model.model_input(tok, vision, data.load_video_sample(rec, data.FrameConfig(max_frames=4)), rec["question"])
greedy = lambda m: model.generate(m, inputs, 1, 8, model.stop_token_ids(m, tok), tok.pad_token_id, 0.0)[0]


def one_step(policy, completion):
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    (-policy(inputs, completion, mode="shared").sum()).backward()
    opt.step()
    return opt


with torch.no_grad():
    want = greedy(vlm)
plain = model.LogProbModule(copy.deepcopy(vlm))
one_step(plain, want)                                  # the same step without sharding
for layer in list(vlm.model.language_model.layers) + list(vlm.model.visual.blocks):
    fully_shard(layer)
policy = fully_shard(model.LogProbModule(vlm))
with torch.no_grad(), train.full_params(policy):       # generation before any forward through the root
    assert torch.equal(greedy(vlm), want)
opt = one_step(policy, want)
rt = config.Runtime(None, torch.device("cpu"), torch.float32, rank, 2)
weights = train.full_state_dict(rt, policy)            # every rank takes part
run = SimpleNamespace(policy=policy, opt=SimpleNamespace(optimizer=opt), name="sft")
state = train.save_optimizer_state(None, rt, run, 1)   # gathered on rank 0
if rank == 0:
    vlm.save_pretrained(os.path.join(out, "fsdp"), state_dict=weights)
    plain.model.save_pretrained(os.path.join(out, "plain"))
    emb = vlm.model.language_model.embed_tokens.weight
    assert state["state"]["model.model.language_model.embed_tokens.weight"]["exp_avg"].shape == emb.shape
dist.broadcast_object_list(box := [state])
train.load_optimizer_state(rt, policy, run.opt, {{"optimizer": box[0]}}, None)
dist.barrier()
print("fsdp2 ok", flush=True)
"""


def test_fsdp2_on_cpu_generates_saves_full_weights_and_gathers_the_optimizer(tiny_data, tiny_model_dir, tmp_path):
    # torch's fully_shard with gloo (accelerate's FSDP needs GPUs): generation under train.full_params,
    # a step equal to the unsharded one, the full state dict every rank takes part in
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT.format(root=ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           tiny_model_dir, tiny_data, str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.count("fsdp2 ok") == 2, r.stderr[-3000:]
    load = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained
    base, sharded, plain = load(tiny_model_dir), load(str(tmp_path / "fsdp")), load(str(tmp_path / "plain"))
    for (n, p), (_, q), (_, r) in zip(base.named_parameters(), sharded.named_parameters(), plain.named_parameters()):
        assert p.shape == q.shape, n
        torch.testing.assert_close(q, r, atol=1e-6, rtol=0, msg=n)
    assert not torch.equal(base.lm_head.weight, sharded.lm_head.weight)


def test_media_is_checked_once_per_training_file_and_again_when_it_changes(tiny_data, tmp_path, monkeypatch):
    data_dir = tmp_path / "d"
    shutil.copytree(tiny_data, data_dir)
    calls = []
    monkeypatch.setattr(data, "check_media", lambda records: calls.append(len(records)))
    cfg = train.Config(data_dir=str(data_dir), batch_size=4)
    first = train.load_train_records(cfg)
    assert train.load_train_records(cfg) == first and len(calls) == 1     # the next stage of the same run
    st = os.stat(data_dir / "train.json")
    os.utime(data_dir / "train.json", (st.st_atime, st.st_mtime + 10))     # the file was rewritten
    train.load_train_records(cfg)
    assert calls == [len(first), len(first)]
