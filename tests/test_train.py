"""train.py and config.py: overrides and choices checked at parse time, --help, SFT lowers the loss,
atomic checkpoints, exact resume, torchrun."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers

import config
import data
import model
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_are_type_checked():
    cfg = train.parse_args(["--lr=0.5", "--train_vision=false", "--stage=sft", "--group_size=3",
                            "--coach=fixed:red_circle", "--vp_darken_factor=0.5"])
    assert (cfg.lr, cfg.train_vision, cfg.stage, cfg.group_size) == (0.5, False, "sft", 3)
    assert (cfg.coach, config.vp_config(cfg).darken_factor) == ("fixed:red_circle", 0.5)
    assert train.parse_args(["--reward_rules=released"]).reward_rules == "released"
    for bad in (["--lr=fast"], ["--nope=1"], ["lr=1"], ["--train_vision=maybe"], ["--group_size=2.5"],
                ["--ratio=tokens"], ["--stage=pretrain"], ["--sd_condition=both"], ["--dtype=fp8"],
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
    assert "--hard_k=2.21 " in text and comments["hard_k"] in text and "--lr=0.1 " in text
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
                sft_warmup=1, save_every=100, max_frames=8)
    base.update(kw)
    return train.Config(**base)


def fixed_batch_loss(path, tiny_data, cfg):
    vlm, tok, vision = model.load_policy(path)
    recs = data.load_records(os.path.join(tiny_data, "train.json"))[:4]
    with torch.no_grad():
        return train.sft_loss(model.LogProbModule(vlm), [train.sft_example(r, tok, vision, cfg) for r in recs]).item()


def test_sft_steps_lower_the_loss(tiny_data, tiny_model_dir, tmp_path):
    cfg = sft_cfg(tiny_data, tmp_path, sft_epochs=2.0)
    rt = train.setup_runtime(cfg)
    before = fixed_batch_loss(tiny_model_dir, tiny_data, cfg)
    ckpt = train.stage_sft(cfg, rt, tiny_model_dir)
    after = fixed_batch_loss(ckpt, tiny_data, cfg)
    assert after < before - 0.5, (before, after)
    rows = [json.loads(l) for l in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    state = train.load_trainer_state(ckpt)
    assert state["done"] and state["step"] == 6


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    full = sft_cfg(tiny_data, tmp_path / "full", sft_epochs=2.0)
    rt = train.setup_runtime(full)
    train.stage_sft(full, rt, tiny_model_dir)

    crash = sft_cfg(tiny_data, tmp_path / "crash", sft_epochs=2.0, save_every=2)
    real_step = train.sft_step

    def crashing_step(cfg, rt, run, records, step):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step(cfg, rt, run, records, step)

    monkeypatch.setattr(train, "sft_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train.stage_sft(crash, rt, tiny_model_dir)
    assert train.load_trainer_state(str(tmp_path / "crash" / "sft" / "last"))["step"] == 2
    assert not os.path.exists(tmp_path / "crash" / "sft" / "last.tmp")
    monkeypatch.setattr(train, "sft_step", real_step)
    train.stage_sft(crash, rt, tiny_model_dir)                       # resumes at step 2

    losses = lambda p: [json.loads(l)["loss"] for l in open(p / "sft" / "metrics.jsonl")]
    full_l, crash_l = losses(tmp_path / "full"), losses(tmp_path / "crash")
    assert crash_l[-3:] == pytest.approx(full_l[-3:], abs=1e-6)  # steps 4..6 after the resume
    a, _, _ = model.load_policy(str(tmp_path / "full" / "sft" / "last"))
    b, _, _ = model.load_policy(str(tmp_path / "crash" / "sft" / "last"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_checkpoint_write_is_atomic(tiny_policy, tmp_path, monkeypatch):
    vlm, tok, vision = tiny_policy
    path = str(tmp_path / "ck")
    train.save_checkpoint(path, vlm, tok, vision, {"step": 1})
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        train.save_checkpoint(path, vlm, tok, vision, {"step": 2})
    monkeypatch.undo()
    assert train.load_trainer_state(path)["step"] == 1               # the old checkpoint is intact
    model.load_policy(path)


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
           "--batch_size=4", "--sft_epochs=0.7", "--max_frames=8", "--device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = train.load_trainer_state(str(tmp_path / "sft" / "last"))
    assert state["done"] and state["step"] == 2


def test_bf16_step_at_paper_lr_moves_fp32_master_weights(tiny_data, tiny_model_dir, tmp_path):
    # one SFT step at the paper's lr 1e-6 in bf16 compute: bf16 parameters would drop nearly every
    # update (their resolution is ~4e-3 relative); fp32 masters under autocast keep them
    cfg = sft_cfg(tiny_data, tmp_path, dtype="bfloat16", lr=1e-6, sft_epochs=0.34)
    ckpt = train.stage_sft(cfg, train.setup_runtime(cfg), tiny_model_dir)
    assert train.load_trainer_state(ckpt)["step"] == 1
    a, b = (safetensors.torch.load_file(os.path.join(d, "model.safetensors")) for d in (tiny_model_dir, ckpt))
    assert {t.dtype for t in b.values()} == {torch.float32}        # the masters were saved, not a bf16 copy
    changed = sum(int((a[k] != b[k]).sum()) for k in a) / sum(t.numel() for t in a.values())
    assert changed > 0.99, changed


SNAPSHOT_AT_STEP_2 = """import shutil
import sys
sys.path.insert(0, {root!r})
import train
real_end_step = train.end_step


def end_step(cfg, rt, run, step, total, metrics, extra_state=None):
    real_end_step(cfg, rt, run, step, total, metrics, extra_state)
    if step == 2 and rt.main:      # what a crash during step 3 would leave behind
        shutil.copytree(train.stage_dir(cfg, run.name), {snapshot!r})


train.end_step = end_step
train.main(sys.argv[1:])
"""


def zero3_launch(script, tiny_data, tiny_model_dir, out):
    """accelerate launch of configs/zero3.yaml with 2 CPU processes (DeepSpeed's CPU accelerator, gloo)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/zero3.yaml",
           "--num_processes=2", "--mixed_precision=no", script, "--stage=sft", f"--model={tiny_model_dir}",
           f"--data_dir={tiny_data}", f"--out_dir={out}", "--batch_size=4", "--sft_epochs=1", "--save_every=2",
           "--max_frames=8", "--dtype=float32"]
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
    assert train.load_trainer_state(str(last))["step"] == 2
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
