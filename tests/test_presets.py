"""configs/real/*.sh, the real-scale presets: each stage script runs as written (bash, its variables and
arithmetic), and every flag it hands train.py / eval.py is a field of the config with a valid value.
The launchers are replaced by stand-ins that record the command line instead of running it."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import config
import eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# accelerate / torchrun / python3 stand-ins: a train.py or eval.py command line is written to $ARGS_FILE,
# one argument a line, from the script's name on; anything else goes to the real interpreter
RECORD = """#!/usr/bin/env bash
while [[ $# -gt 0 && "$1" != *.py ]]; do shift; done
printf '%s\\n' "$@" > "$ARGS_FILE"
"""
PYTHON = """#!/usr/bin/env bash
case "$1" in train.py|eval.py) exec {record} "$@";; *) exec {py} "$@";; esac
"""


@pytest.fixture
def env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("accelerate", "torchrun"):
        (bin_dir / name).write_text(RECORD)
    (bin_dir / "python3").write_text(PYTHON.format(py=sys.executable, record=bin_dir / "accelerate"))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "stgr" / "json").mkdir(parents=True)
    (tmp_path / "stgr" / "json" / "rl.json").write_text(json.dumps([{"id": i} for i in range(40)]))
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STGR=str(tmp_path / "stgr"),
                OUT=str(tmp_path / "out"), ARGS_FILE=str(tmp_path / "args"))


def run_script(env, stage, *args):
    """The preset's train.py / eval.py command line, parsed by the one config (types and choices checked)."""
    r = subprocess.run(["bash", f"configs/real/{stage}.sh", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    script, *argv = open(env["ARGS_FILE"]).read().splitlines()
    return script, config.parse_args(argv, aliases=eval.EVAL_FLAGS if script == "eval.py" else None, prog=script)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_real_scale_stage_scripts_hand_the_release_settings(env):
    frames = dict(fps=2.0, min_frames=4, max_frames=16, max_pixels=128 * 28 * 28)
    script, sft = run_script(env, "sft")
    assert script == "train.py" and sft.stage == "sft" and sft.lr == 1e-6 and sft.grad_clip == 5
    assert {k: getattr(sft, k) for k in frames} == frames and sft.dtype == "bfloat16" and sft.gradient_checkpointing
    script, sel = run_script(env, "selector")
    assert sel.stage == "selector" and sel.model == os.path.join(env["OUT"], "sft", "last")
    assert sel.train_json == os.path.join(env["STGR"], "json", "rl.json")   # predictions for the RL ids
    script, rl = run_script(env, "rl")
    assert rl.stage == "rl" and rl.coach == "selector" and rl.out_dir == sel.out_dir
    assert (rl.rl_lr, rl.group_size, rl.beta, rl.max_new_tokens, rl.max_prompt_tokens) == (1e-6, 4, 0.04, 768, 16384)
    assert rl.rl_steps == 40 // 8 and rl.batch_size == 8                   # one epoch, one prompt per GPU
    assert {k: getattr(rl, k) for k in frames} == frames
    script, ev = run_script(env, "eval", "runs/7b/rl/last", "/stgr/json/test.json", "--fps=1")
    assert script == "eval.py" and ev.eval_data == "/stgr/json/test.json" and ev.fps == 1.0   # V-STAR's 1 fps
    assert ev.max_pixels == frames["max_pixels"] and ev.max_frames == 16
