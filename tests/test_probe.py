"""The perception probe: its frames, targets and scoring, a two-step run, and value tokens."""
import dataclasses
import json
import math
import os
import random
import re
from types import SimpleNamespace

import pytest
import torch

import data as D
import model as M
import probe
import rewards
import synth


def test_frame_target_box_covers_the_named_object():
    rng = random.Random(1)
    for _ in range(20):
        frame, shapes = probe.sample_frame(rng, 4)
        names = [s.name(0) for s in shapes]
        assert len(set(names)) == len(names)
        x1, y1, x2, y2 = D.norm_box_to_pixels(shapes[0].box(0), synth.SIZE, synth.SIZE)
        cx, cy = (x1 + x2) // 2, (y1 + y2 + 1) // 2  # a triangle's centre row is inside it
        assert tuple(frame[:, cy, cx].tolist()) == synth.COLOURS[shapes[0].colours[0]]


def test_marked_sample_draws_a_mark_and_find_does_not():
    cfg = probe.ProbeConfig(marks="red_circle")
    find = probe.make_sample(random.Random(5), cfg, "find", 2)
    marked = probe.make_sample(random.Random(5), cfg, "marked", 2)  # same scene, then the mark
    assert find.name == marked.name and find.box == marked.box
    ring = (marked.frame != find.frame).any(0)
    assert ring.sum() > 20
    assert (marked.frame[:, ring] == torch.tensor([255, 0, 0])[:, None]).all()


@pytest.mark.parametrize("text,iou,name", [
    ("<obj>red circle</obj><box>[10,20,30,40]</box>", 1.0, "red circle"),
    ("<obj>red circle</obj><box>[20,20,30,40]</box>", 0.5, "red circle"),
    ("<obj>blue square</obj><box>[60,60,80,80]</box>", 0.0, "blue square"),
    ("<obj>red circle</obj><box>[10,20,30]</box>", 0.0, "red circle"),   # three numbers: no box
    ("<box>[30,40,10,20]</box>", 0.0, None),                              # inverted box
    (",,,,,", 0.0, None),
])
def test_score_find(text, iou, name):
    sample = probe.Sample("find", None, "", "red circle", [0.1, 0.2, 0.3, 0.4])
    r = probe.score(sample, text, (100, 100))
    assert r["iou"] == pytest.approx(iou)
    assert r["name_ok"] == float(name == "red circle")


def test_target_text_parses_back_to_the_box():
    rng, cfg = random.Random(2), probe.ProbeConfig()
    for task in ("find", "marked"):
        s = probe.make_sample(rng, cfg, task, 3)
        r = probe.score(s, probe.target_text(s, (224, 224)), (224, 224))
        assert r["parsed"]
        assert (r["iou"] > 0.9) if task == "find" else r["correct"] == 1.0


def test_list_target_names_and_boxes_every_object_left_to_right():
    s = probe.Sample("list", None, probe.LIST_Q, "red circle", [0.5, 0.5, 0.6, 0.6],
                     [("red circle", [0.5, 0.5, 0.6, 0.6]), ("blue square", [0.1, 0.7, 0.2, 0.8]),
                      ("green triangle", [0.8, 0.0, 0.9, 0.1])])
    assert probe.target_text(s, (100, 100)) == (
        "<obj>blue square</obj><box>[10,70,20,80]</box><obj>red circle</obj><box>[50,50,60,60]</box>"
        "<obj>green triangle</obj><box>[80,0,90,10]</box>")
    cfg = probe.ProbeConfig(find_weight=0, marked_weight=0, list_weight=1)
    drawn = probe.training_sample(random.Random(3), cfg, 0)
    assert drawn.task == "list" and drawn.question == probe.LIST_Q
    assert probe.target_text(drawn, (112, 112)).count("<box>") == len(drawn.objects)


def test_box_only_find_answer_drops_the_name_and_keeps_the_box():
    s = probe.Sample("find", None, "Where is the red circle?", "red circle", [0.1, 0.2, 0.3, 0.4])
    assert probe.target_text(s, (100, 100), "box") == "<box>[10,20,30,40]</box>"
    assert probe.target_text(s, (100, 100)) == "<obj>red circle</obj><box>[10,20,30,40]</box>"
    assert probe.score(s, probe.target_text(s, (100, 100), "box"), (100, 100))["iou"] == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="find_answer"):
        probe.parse_args(["--find_answer=name"])


def test_text_objects_list_every_object_for_the_first_steps_only():
    cfg = probe.ProbeConfig(marked_weight=0, text_objects_steps=5)
    early = probe.training_sample(random.Random(6), cfg, 4)
    listing, question = early.question.split("\n")
    assert question == probe.FIND_Q.format(early.name)
    for name, box in early.objects:
        x1, y1, x2, y2 = D.norm_box_to_pixels(box, 112, 112)
        assert f"{name} [{x1},{y1},{x2},{y2}]" in listing
    late = probe.training_sample(random.Random(6), cfg, 5)
    assert late.question == probe.FIND_Q.format(late.name)


def test_value_tokens_round_trip():
    tok = M.build_tokenizer(probe.tokenizer_corpus(n=20), 400, value_tokens=113)
    for v in range(113):
        assert tok.encode(str(v), add_special_tokens=False) == [tok.convert_tokens_to_ids(str(v))]
    for text in ("<obj>red circle</obj><box>[0,7,112,58]</box>", "at<t>12.5</t>s", "[1000, 250]",
                 "Frame 12 at 0.5s: B"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    box = tok.encode("<box>[12,30,105,58]</box>", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(box) == ["<box>", "[", "12", ",", "30", ",", "105", ",", "58", "]", "</box>"]
    assert len(tok.encode("1000", add_special_tokens=False)) == 2   # past the range: longest match first
    plain = M.build_tokenizer(probe.tokenizer_corpus(n=20), 400)
    assert len(plain.encode("[12,30,105,58]", add_special_tokens=False)) == 14  # one token per digit


def test_two_steps_give_finite_loss_and_a_curve(tmp_path):
    cfg = probe.ProbeConfig(out=str(tmp_path), max_steps=2, batch_size=4, eval_frames=2, eval_every=1e9,
                            value_tokens=113, patch_size=7, save=True)
    init = probe.build_model(cfg, str(tmp_path / "init"))[0].state_dict()
    result = probe.run(cfg, log=lambda *a: None)
    first, last = result["curve"]
    assert (first["step"], last["step"], last["samples"]) == (0, 2, 8)
    assert torch.isfinite(torch.tensor(last["loss"])) and last["loss"] > 0
    for key in ("box_miou", "box_iou50", "marked_acc", "parsed"):
        assert 0.0 <= last[key] <= 1.0
    saved = json.load(open(tmp_path / "curve.json"))
    assert saved["curve"] == result["curve"]
    assert len(saved["first_losses"]) == 2 and sum(saved["first_losses"]) / 2 == pytest.approx(last["loss"], abs=1e-4)
    assert os.path.getsize(tmp_path / "curve.png") > 1000
    vision = M.VisionProcessor.load(str(tmp_path / "model"))
    assert vision.patch_size == 7
    saved = M.load_policy(str(tmp_path / "model"))[0].state_dict()   # the last evaluation's weights, moved into place
    assert saved.keys() == init.keys() and not (tmp_path / "model.tmp").exists()
    assert any(not torch.equal(saved[k], init[k]) for k in init)      # trained, not the initial weights
    gains = [v for k, v in saved.items() if k.startswith("model.language_model.layers") and k.endswith("norm.weight")]
    assert gains and all(torch.equal(g, torch.ones_like(g)) for g in gains)   # saved at a fresh model's scale
    emb = "model.language_model.embed_tokens.weight"
    assert saved[emb].norm(dim=1).mean().item() == pytest.approx(init[emb].norm(dim=1).mean().item(), rel=0.05)


def test_bad_argument_names_the_field():
    with pytest.raises(SystemExit, match="patch_size"):
        probe.parse_args(["--patch_size=big"])
    with pytest.raises(SystemExit, match="marks"):
        probe.parse_args(["--marks=frame_numbers"])


def test_ordinal_value_init_puts_neighbouring_values_closer(tmp_path):
    texts = probe.tokenizer_corpus(n=20)
    cfg = M.TinyModelConfig(vocab_size=400, value_tokens=113, value_init="ordinal")
    M.build_tiny_model(str(tmp_path / "ordinal"), texts, cfg)
    model, tok, _ = M.load_policy(str(tmp_path / "ordinal"))  # the init survives saving, tied head too
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    emb = model.get_input_embeddings().weight.detach()
    rows = emb[tok.convert_tokens_to_ids([str(v) for v in range(113)])]
    dist = torch.cdist(rows, rows)                                          # (113, 113)
    for v in range(1, 112):
        far = torch.cat([dist[v, :max(v - 6, 0)], dist[v, v + 7:]])
        assert dist[v, v - 1] < far.min() and dist[v, v + 1] < far.min()
    assert dist[0, 112] > dist[0, 1]                                        # the ends are not neighbours
    others = emb[[i for i in range(len(emb)) if i not in set(tok.convert_tokens_to_ids([str(v) for v in range(113)]))]]
    assert rows.norm(dim=1).mean() == pytest.approx(others.norm(dim=1).mean().item(), rel=0.1)
    cfg.value_init = "random"
    M.build_tiny_model(str(tmp_path / "random"), texts, cfg)
    model, tok, _ = M.load_policy(str(tmp_path / "random"))
    rows = model.get_input_embeddings().weight.detach()[tok.convert_tokens_to_ids([str(v) for v in range(113)])]
    dist = torch.cdist(rows, rows)
    near, far = dist[torch.arange(112), torch.arange(1, 113)].mean(), dist[torch.arange(83), torch.arange(30, 113)].mean()
    assert near > 0.9 * far                                                 # random rows: no order


def test_soft_value_targets_peak_at_the_value_and_spread_to_neighbours():
    tok = M.build_tokenizer(probe.tokenizer_corpus(n=20), 400, value_tokens=113)
    value_of, ids, soft = probe.value_targets(tok, 113, 2.0)
    assert value_of[tok.convert_tokens_to_ids("40")] == 40 and ids[40] == tok.convert_tokens_to_ids("40")
    assert torch.allclose(soft.sum(1), torch.ones(113))
    assert soft[40].argmax() == 40 and soft[40, 39] == soft[40, 41] > soft[40, 44] > soft[40, 60]


def test_gradient_background_says_where_and_leaves_objects_alone():
    flat, shapes = probe.sample_frame(random.Random(3), 3)
    grad, _ = probe.sample_frame(random.Random(3), 3, "gradient")
    grey = (flat == synth.BACKGROUND).all(0)                                # (H, W) background pixels
    assert torch.equal(flat[:, ~grey], grad[:, ~grey]) and grey.float().mean() > 0.5
    bg = synth.gradient_background()
    assert torch.equal(grad[:, grey], bg[:, grey])
    assert (bg[0, :, 1:] >= bg[0, :, :-1]).all() and bg[0, 0, -1] - bg[0, 0, 0] > 50   # red grows with x
    assert (bg[2, 1:] >= bg[2, :-1]).all() and bg[2, -1, 0] - bg[2, 0, 0] > 50         # blue with y
    assert (bg[0] == bg[0, :1]).all() and (bg[1] == synth.BACKGROUND).all()
    with pytest.raises(ValueError, match="background"):
        synth.render(synth.Scene(0.25, shapes, "", (0.0, 0.0), "", False, 0), "stripes")


def test_dense_targets_table():
    # 4 x 4 cells of 0.25; centres: red circle (0.2, 0.2) -> cell 0, blue square (0.75, 0.25) -> row 1
    # col 3 = cell 7, green triangle (0.15, 0.1) -> cell 0 too, where the target wins.
    objects = [("red circle", [0.1, 0.1, 0.3, 0.3]), ("blue square", [0.6, 0.1, 0.9, 0.4]),
               ("green triangle", [0.05, 0.0, 0.25, 0.2])]
    sample = probe.Sample("marked", None, "", "red circle", objects[0][1], objects)
    cls, box, marked = probe.dense_targets(sample, 4, 4)
    none = len(probe.NAMES)
    expected = [none] * 16
    expected[0], expected[7] = probe.NAME_INDEX["red circle"], probe.NAME_INDEX["blue square"]
    assert cls.tolist() == expected
    assert box[0].tolist() == pytest.approx([0.1, 0.1, 0.3, 0.3]) and box[7].tolist() == pytest.approx([0.6, 0.1, 0.9, 0.4])
    assert box[1:7].abs().sum() == 0
    assert marked.tolist() == [1.0] + [0.0] * 15
    find = probe.Sample("find", None, "", "red circle", objects[0][1], objects)
    assert probe.dense_targets(find, 4, 4)[2].sum() == 0           # nothing is marked on a find frame
    assert probe.dense_targets(find, 2, 2)[0].tolist() == [probe.NAME_INDEX["red circle"],
                                                           probe.NAME_INDEX["blue square"], none, none]


def test_dense_pretraining_moves_only_the_vision_tower(tmp_path):
    cfg = probe.ProbeConfig(out=str(tmp_path), aux_steps=3, max_steps=0, batch_size=4, eval_frames=1, log_every=1)
    torch.manual_seed(cfg.seed)
    vlm, tok, vision = probe.build_model(cfg, str(tmp_path / "m"))
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    head = torch.nn.Linear(vlm.config.vision_config.out_hidden_size, probe.AUX_OUT)
    lines = []
    probe.pretrain_vision(cfg, vlm, head, tok, vision, random.Random(0), {"wall": 0.0, "cpu": 0.0}, lines.append)
    changed = {n for n, p in vlm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.visual.") for n in changed)
    assert any("merger" in n for n in changed) and any("patch_embed" in n for n in changed)
    assert len(lines) == 3 and "cell class acc" in lines[-1]


def test_dense_linear_probe_trains_the_head_alone(tmp_path):
    """--aux_head_only: the tower is frozen (a linear probe of its features); the head learns."""
    cfg = probe.ProbeConfig(out=str(tmp_path), aux_steps=3, max_steps=0, batch_size=4, eval_frames=1, log_every=1,
                            aux_head_only=True)
    torch.manual_seed(cfg.seed)
    vlm, tok, vision = probe.build_model(cfg, str(tmp_path / "m"))
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    head = torch.nn.Linear(vlm.config.vision_config.out_hidden_size, probe.AUX_OUT)
    head_before = head.weight.detach().clone()
    probe.pretrain_vision(cfg, vlm, head, tok, vision, random.Random(0), {"wall": 0.0, "cpu": 0.0}, lambda _: None)
    assert all(torch.equal(p, before[n]) for n, p in vlm.named_parameters())
    assert not torch.equal(head.weight, head_before)
    assert all(p.requires_grad for p in vlm.parameters())  # the tower trains again in what follows


def test_dense_loss_kept_in_training_reads_the_single_frames_of_a_batch_with_clips(tmp_path):
    """--aux_weight with clip tasks (qa here): the dense loss sees the batch's single frames only (a
    clip's cells hold no one frame's objects), so the head's gradient is the frames' alone x weight."""
    cfg = probe.ProbeConfig(out=str(tmp_path), qa_weight=1.0, aux_weight=0.5, prompt="question_first", warmup=1)
    torch.manual_seed(cfg.seed)
    vlm, tok, vision = probe.build_model(cfg, str(tmp_path / "m"))
    head = torch.nn.Linear(vlm.config.vision_config.out_hidden_size, probe.AUX_OUT)
    rng = random.Random(1)
    samples = [probe.make_sample(rng, cfg, task, 0) for task in ("qa", "find", "qa", "marked")]
    assert [s.clip is None for s in samples] == [False, True, False, True]
    batch = [probe.encode(s, tok, vision, cfg.prompt, "cpu", cfg.find_answer, probe.clip_layout(cfg)) for s in samples]
    frames = [1, 3]
    probe.dense_loss(vlm, head, [batch[i][0] for i in frames], [samples[i] for i in frames])[0].backward()
    alone = head.weight.grad.clone()
    head.weight.grad = None
    opt, sched = probe.make_optimizer(cfg, vlm, head)
    probe.train_step(vlm, opt, sched, batch, cfg.grad_clip, dense=(head, samples, cfg.aux_weight))
    assert torch.allclose(head.weight.grad, 0.5 * alone, atol=1e-6) and alone.abs().sum() > 0


def test_distinct_colours_gives_every_object_its_own_colour():
    rng, seen = random.Random(4), set()
    for _ in range(30):
        _, shapes = probe.sample_frame(rng, 3, distinct_colours=True)
        colours = [s.colours[0] for s in shapes]
        assert len(set(colours)) == len(colours)
        seen.update(s.kind for s in shapes)
    assert seen == set(synth.KINDS)                                         # the kinds still vary
    # the default lets a distractor share the target's colour
    frames = [probe.sample_frame(random.Random(i), 3)[1] for i in range(30)]
    assert any(len({s.colours[0] for s in shapes}) < len(shapes) for shapes in frames)


def test_batched_held_out_evaluation_equals_one_frame_at_a_time(sharp):
    vlm, tok, vision = sharp
    samples = probe.held_out(probe.ProbeConfig(eval_frames=3, background="flat"))   # 3 find + 3 marked frames
    one = probe.evaluate(vlm, tok, vision, samples, "short", max_new_tokens=8, batch=1)
    many = probe.evaluate(vlm, tok, vision, samples, "short", max_new_tokens=8, batch=4)  # chunks of 4 and 2
    assert one == many
    assert len(set(one["examples"])) > 1                 # the answers depend on the frame


def test_question_first_puts_the_image_tokens_after_the_question(tiny_policy):
    _, tok, vision = tiny_policy
    s = probe.make_sample(random.Random(2), probe.ProbeConfig(background="flat"), "find", 1)
    pad = tok.convert_tokens_to_ids(D.IMAGE_PAD)
    question = tok.encode(s.question, add_special_tokens=False)
    for style, image_first in (("short", True), ("question_first", False)):
        p, target = probe.encode(s, tok, vision, style)
        ids = p.input_ids.tolist()
        first_image = ids.index(pad)
        at = next(i for i in range(len(ids)) if ids[i:i + len(question)] == question)
        assert (first_image < at) == image_first, style
        assert ids.count(pad) == 16 and (p.mm_token_type_ids == 1).sum() == 16   # 112x112: 4x4 merged tokens
    assert probe.parse_args(["--prompt=question_first"]).prompt == "question_first"


def test_cell_index_table():
    # 4 x 4 cells of 0.25: centre (0.2, 0.2) -> 0; (0.75, 0.25) -> row 1, col 3 = 7; the edge 1.0 stays in the grid
    assert probe.cell_index([0.1, 0.1, 0.3, 0.3], 4, 4) == 0
    assert probe.cell_index([0.6, 0.1, 0.9, 0.4], 4, 4) == 7
    assert probe.cell_index([0.9, 0.9, 1.0, 1.0], 4, 4) == 15
    assert probe.cell_index([0.6, 0.1, 0.9, 0.4], 2, 3) == 2                   # 2 rows x 3 cols: row 0, col 2


class _Prompt:  # what binding_loss reads of a prompt: its length, its image grid, its frame size
    def __init__(self, n, grid, frame_size=(112, 112)):
        self.n, self.image_grid_thw, self.frame_size = n, torch.tensor([grid]), frame_size

    def __len__(self):
        return self.n


def test_binding_loss_hand_computed_table():
    # One frame of 2 x 2 merged cells (grid 4 x 4 patches, merge 2) at positions 2..5 of a 7-token
    # prompt; a 3-token answer predicted from positions 6, 7, 8. The only object's centre (0.75, 0.25)
    # is in cell 1. The head is the identity on zero states: uniform class (log 13) and pointer
    # (log 4) logits, a zero box (L1 x 10 = 5).
    box = [0.6, 0.1, 0.9, 0.4]
    types = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0, 0]])
    attn = torch.full((1, 2, 10, 10), 0.01)
    attn[0, 0, 6, 3], attn[0, 0, 7, 3], attn[0, 0, 8, 3] = 0.5, 0.25, 1.0    # head 0 on cell 1 (position 3)
    out = SimpleNamespace(hidden_states=[None, torch.zeros(1, 10, probe.AUX_OUT)], attentions=[attn])
    head = torch.nn.Linear(probe.AUX_OUT, probe.AUX_OUT)
    torch.nn.init.eye_(head.weight), torch.nn.init.zeros_(head.bias)
    batch = [(_Prompt(7, [1, 4, 4]), torch.zeros(3, dtype=torch.long))]
    attend = -(math.log(0.5) + math.log(0.25) + math.log(1.0)) / 3
    table = [  # task, prompt, bind loss per unit weight (class + box [+ pointer])
        ("marked", "short", math.log(13) + 5 + math.log(4)),       # the mark is drawn: a pointer
        ("find", "question_first", math.log(13) + 5 + math.log(4)),  # the question came first: a pointer
        ("find", "short", math.log(13) + 5),                        # the frame cannot know the question: none
    ]
    for task, style, bind in table:
        cfg = probe.ProbeConfig(bind_weight=1.0, bind_layer=1, attend_weight=2.0, attend_layer=1, prompt=style)
        sample = probe.Sample(task, None, "", "red circle", box, [("red circle", box)])
        loss, stats = probe.binding_loss(out, types, batch, [sample], head, cfg, merge=2)
        assert loss.item() == pytest.approx(bind + 2.0 * attend, rel=1e-5), (task, style)
        assert stats["attend_nll"] == pytest.approx(attend, rel=1e-5)
        assert stats["bind_ptr_acc"] == 0.0                     # uniform logits: argmax is cell 0, not 1
    listing = probe.Sample("list", None, "", "red circle", box, [("red circle", box)])
    loss, stats = probe.binding_loss(out, types, batch, [listing], head, cfg, merge=2)
    assert loss.item() == pytest.approx(math.log(13) + 5, rel=1e-5)   # no single target: no pointer, no attend
    with pytest.raises(SystemExit, match="attend_layer"):
        probe.parse_args(["--attend_layer=5"])


def test_attend_aid_teaches_head_zero_to_look_at_the_target(tmp_path):
    cfg = probe.ProbeConfig(out=str(tmp_path), batch_size=8, attend_weight=1.0, bind_weight=1.0,
                            prompt="question_first", background="flat", warmup=1)
    torch.manual_seed(cfg.seed)
    vlm, tok, vision = probe.build_model(cfg, str(tmp_path / "m"))
    head = torch.nn.Linear(vlm.config.text_config.hidden_size, probe.AUX_OUT)
    opt, sched = probe.make_optimizer(cfg, vlm, None, head)
    rng, nll = random.Random(0), []
    for step in range(22):
        samples = [probe.training_sample(rng, cfg, step) for _ in range(cfg.batch_size)]
        batch = [probe.encode(s, tok, vision, cfg.prompt) for s in samples]
        _, _, stats = probe.train_step(vlm, opt, sched, batch, cfg.grad_clip, binding=(head, samples, cfg, tok))
        nll.append(stats["attend_nll"])
    # at the start head 0 spreads over the ~40 earlier positions (-log 1/40 = 3.7); it learns to look
    # (seed 0 here: 3.62 at the start, 1.92 over the last 10 steps; batches of 8 are noisy)
    assert nll[0] > 3.0 and sum(nll[-10:]) / 10 < 0.65 * nll[0]


def test_text_sample_answer_is_the_listed_object():
    rng = random.Random(3)
    cfg = probe.ProbeConfig()
    seen = set()
    for _ in range(40):
        task, question, answer, lead = probe.text_sample(rng, cfg)
        seen.add(task)
        assert lead == ""
        head, listing = question.split("\nObjects: ")
        entries = listing.split("; ")
        if task == "find":
            name, box = probe.parse_answer(answer)
            assert head == probe.FIND_Q.format(name)
            box_text = "[" + ",".join(str(int(v)) for v in box) + "]"
            assert f"{name} {box_text}" in entries                  # the answer copies the listed box
            assert not any(e.startswith("marked") for e in entries)
        else:
            assert head == probe.MARKED_Q
            marked = [e for e in entries if e.startswith("marked ")]
            assert len(marked) == 1 and answer == f"<obj>{marked[0][7:].rsplit(' ', 1)[0]}</obj>"
        names = [e.removeprefix("marked ").rsplit(" ", 1)[0] for e in entries]
        assert len(set(names)) == len(names) <= cfg.max_distractors + 1
    assert seen == {"find", "marked"}


def test_text_letter_sample_is_the_letter_task_in_words(tiny_policy):
    _, tok, _ = tiny_policy
    cfg = probe.ProbeConfig(find_weight=0, marked_weight=0, letter_weight=1.0)
    rng = random.Random(6)
    rng.random()                                                   # text_sample's draw of the task
    clip = probe.make_sample(rng, cfg, "letter", 0)
    task, question, answer, lead = probe.text_sample(random.Random(6), cfg)
    assert task == "letter" and (question, answer, lead) == (clip.question, clip.trace, clip.lead)  # the same draw
    ids, mask, predicts = probe.text_batch_ids(tok, [(task, question, answer, lead)], "cpu")
    assert tok.decode(ids[0, 1:][predicts[0, :-1]]) == f"{answer}<|im_end|>"   # the loss: the letter on
    prompt = tok.decode(ids[0][:int(predicts[0].nonzero()[0]) + 1])
    assert prompt.endswith(lead) and question in prompt and "<|image_pad|>" not in prompt   # words alone, cut as the clip's
    mixed = dataclasses.replace(cfg, find_weight=1.0, marked_weight=1.0)
    assert {probe.text_sample(random.Random(k), mixed)[0] for k in range(30)} == {"find", "marked", "letter"}


def test_text_pretraining_moves_only_the_text_model_and_learns(tmp_path):
    cfg = probe.ProbeConfig(out=str(tmp_path), text_steps=12, text_batch=8, warmup=1, log_every=6, max_distractors=1)
    torch.manual_seed(cfg.seed)
    vlm, tok, vision = probe.build_model(cfg, str(tmp_path / "m"))
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    lines = []
    probe.pretrain_text(cfg, vlm, tok, random.Random(0), {"wall": 0.0, "cpu": 0.0}, lines.append)
    changed = {n for n, p in vlm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any("visual" in n for n in changed)
    assert any("embed_tokens" in n for n in changed) and any("layers.3." in n for n in changed)
    losses = [float(line.split(" loss ")[1].split()[0]) for line in lines]
    assert len(losses) == 2 and losses[1] < 0.75 * losses[0]     # seed 0: 5.36 over steps 1-6, 3.37 over 7-12
    ids, mask, predicts = probe.text_batch_ids(tok, [probe.text_sample(random.Random(1), cfg)], "cpu")
    answer = tok.decode(ids[0, 1:][predicts[0, :-1]])
    assert answer.startswith("<obj>") and answer.endswith("<|im_end|>")   # the target mask covers the answer only


def test_init_starts_from_the_saved_model_and_text_mix_adds_words(tmp_path):
    small = probe.ProbeConfig(out=str(tmp_path / "a"), max_steps=1, batch_size=4, eval_frames=2, eval_steps=1,
                              num_layers=2, save=True)
    probe.run(small, log=lambda *a: None)                            # a 2-layer model saved in a/model
    saved = M.load_policy(str(tmp_path / "a" / "model"))[0].state_dict()
    cfg = probe.ProbeConfig(init=str(tmp_path / "a" / "model"), max_steps=2, batch_size=4, text_batch=4,
                            eval_frames=2, eval_steps=100, log_every=1)   # its own shape flags say 4 layers
    plain = probe.run(dataclasses.replace(cfg, out=str(tmp_path / "b")), log=lambda *a: None)
    lines = []
    mixed = probe.run(dataclasses.replace(cfg, out=str(tmp_path / "c"), text_mix=True), log=lines.append)
    assert json.load(open(tmp_path / "c" / "model" / "config.json"))["num_hidden_layers"] == 2   # the folder's shape
    assert plain["curve"][0]["box_miou"] == mixed["curve"][0]["box_miou"]
    # the first step's frame loss is the saved model's (both start from it); the words change the update
    assert mixed["first_losses"][0] == pytest.approx(plain["first_losses"][0], rel=1e-6)
    assert mixed["first_losses"][1] != pytest.approx(plain["first_losses"][1], rel=1e-6)
    assert sum(" words " in line for line in lines) == 2
    fresh = probe.run(dataclasses.replace(cfg, init="", num_layers=2, out=str(tmp_path / "d")), log=lambda *a: None)
    assert fresh["first_losses"][0] != pytest.approx(plain["first_losses"][0], rel=1e-3)   # not a fresh model
    trained = M.load_policy(str(tmp_path / "a" / "model"))[0].state_dict()
    assert all(torch.equal(trained[k], saved[k]) for k in saved)    # the init folder itself is left as it was
    with pytest.raises(SystemExit, match="--init"):
        probe.run(dataclasses.replace(cfg, init=str(tmp_path / "nowhere"), out=str(tmp_path / "e")))


CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")


def test_question_at_is_saved_with_the_model_for_sft_and_eval(tmp_path):
    init = os.path.join(CHECKPOINTS, "perception")
    cfg = probe.ProbeConfig(init=init, question_at="both")
    probe.start_from(cfg, str(tmp_path / "a"))
    assert M.VisionProcessor.load(str(tmp_path / "a")).question_at == "both"
    probe.start_from(dataclasses.replace(cfg, init=str(tmp_path / "a"), question_at=""), str(tmp_path / "b"))
    assert M.VisionProcessor.load(str(tmp_path / "b")).question_at == "both"     # empty keeps the init's
    assert M.VisionProcessor.load(init).question_at == "after"                   # the init folder is untouched
    with pytest.raises(SystemExit, match="question_at"):
        probe.parse_args(["--question_at=first"])


def rerun_two_steps(folder, tmp_path):
    """A committed checkpoint folder's run (curve.json's config), its first two steps rerun into tmp_path
    (--init resolved against the repository; of a run with dense vision steps first, two of those)
    -> (its config, the record, the rerun's result)."""
    record = json.load(open(os.path.join(folder, "curve.json")))
    cfg = probe.ProbeConfig(**record["config"])
    init = os.path.join(os.path.dirname(CHECKPOINTS), cfg.init) if cfg.init else ""
    rerun = dataclasses.replace(cfg, out=str(tmp_path), max_steps=2, eval_frames=2, save=False, init=init,
                                aux_steps=min(cfg.aux_steps, 2))
    return cfg, record, probe.run(rerun, log=lambda *a: None)


# each committed checkpoint and the one its run started from (--init)
CHECKPOINT_STARTS = {"perception_frames": "", "perception": "checkpoints/perception_frames",
                     "perception_dense": "checkpoints/perception"}


@pytest.mark.parametrize("name", list(CHECKPOINT_STARTS))
def test_the_committed_perception_checkpoints_are_what_their_commands_make(name, tmp_path):
    """checkpoints/perception_frames holds the model and curve.json of one probe.py run from a fresh
    model; checkpoints/perception of a second run from that model (--init, --text_mix), and
    checkpoints/perception_dense of a third from that one, with thousands of dense vision steps
    first (--aux_steps; the README gives all three commands). Each run's first steps, rerun here,
    give the recorded losses (the dense ones where the run had dense steps: the text steps come
    after thousands of them); the first builds the same tokenizer and model config, the others keep
    their start's; and the committed weights score the run's last held-out evaluation (the same
    frames, greedy; saved rescaled, so near-ties may flip a token)."""
    folder = os.path.join(CHECKPOINTS, name)
    cfg, record, result = rerun_two_steps(folder, tmp_path)
    if cfg.aux_steps > 2:
        assert result["first_dense_losses"] == pytest.approx(record["first_dense_losses"][:2], rel=1e-4)
    else:
        assert result["first_losses"] == pytest.approx(record["first_losses"][:2], rel=1e-4)
    assert cfg.init == CHECKPOINT_STARTS[name]
    for file in ("tokenizer.json", "config.json", "preprocessor_config.json"):
        assert json.load(open(tmp_path / "model" / file)) == json.load(open(os.path.join(folder, file))), file
    vlm, tok, vision = M.load_policy(folder)
    last = record["curve"][-1]
    scores = probe.evaluate(vlm.eval(), tok, vision, probe.held_out(cfg), cfg.prompt)
    assert last["step"] == cfg.max_steps
    assert scores["box_miou"] == pytest.approx(last["box_miou"], abs=0.02)
    assert scores["marked_acc"] == pytest.approx(last["marked_acc"], abs=0.02)


def test_at_sample_boxes_the_named_object_in_the_frame_shown_at_the_asked_time():
    rng, cfg, checked = random.Random(3), probe.ProbeConfig(at_weight=1.0), 0
    for _ in range(12):
        s = probe.make_sample(rng, cfg, "at", 0)
        frames, times, duration, t = s.clip
        assert len(times) == len(frames) == len(D.sample_times(duration)) and t in times
        assert s.question == f"Where is the {s.name} at {D.format_seconds(t)}s?"
        shown = frames[times.index(t)]
        assert torch.equal(shown, s.frame)
        assert (s.name, s.box) in s.objects
        # the named object's pixels in the asked frame fill its box (+-2 px), unless another object is near
        x1, y1, x2, y2 = D.norm_box_to_pixels(s.box, synth.SIZE, synth.SIZE)
        lo, hi = [max(x1 - 4, 0), max(y1 - 4, 0)], [min(x2 + 5, synth.SIZE), min(y2 + 5, synth.SIZE)]
        near = [b for n, b in s.objects if n != s.name and b[0] * synth.SIZE < hi[0] and b[2] * synth.SIZE > lo[0]
                and b[1] * synth.SIZE < hi[1] and b[3] * synth.SIZE > lo[1]]
        if not near:
            colour = torch.tensor(synth.COLOURS[s.name.split()[0]], dtype=torch.uint8)[:, None, None]
            ys, xs = (shown[:, lo[1]:hi[1], lo[0]:hi[0]] == colour).all(0).nonzero(as_tuple=True)
            checked += 1
            assert abs(int(xs.min()) + lo[0] - x1) <= 2 and abs(int(xs.max()) + 1 + lo[0] - x2) <= 2
            assert abs(int(ys.min()) + lo[1] - y1) <= 2 and abs(int(ys.max()) + 1 + lo[1] - y2) <= 2
        text = probe.target_text(s, (synth.SIZE, synth.SIZE))
        assert text.endswith(f"at<t>{D.format_seconds(t)}</t>s")
        r = probe.score(s, text, (synth.SIZE, synth.SIZE))
        assert r["parsed"] and r["iou"] > 0.9 and r["name_ok"] == 1.0
    assert checked >= 6


def test_when_sample_asks_the_events_tg_question_and_its_span_is_where_the_frames_show_it():
    cfg = probe.ProbeConfig(when_weight=1.0, when_events="appear")
    rng, checked = random.Random(5), 0
    for _ in range(6):
        s = probe.make_sample(rng, cfg, "when", 0)
        frames, times, duration, _ = s.clip
        assert times == D.sample_times(duration) and len(frames) == len(times)
        start, end = s.span
        assert start in times and end in times and end > start
        assert s.question == f"When is the {s.name} visible?"              # synth's TG question for appear
        colour = torch.tensor(synth.COLOURS[s.name.split()[0]], dtype=torch.uint8)[:, None, None]
        count = [int((f == colour).all(0).sum()) for f in frames]
        inside = [c for c, t in zip(count, times) if start <= t <= end]
        outside = [c for c, t in zip(count, times) if not start <= t <= end]
        assert min(inside) - max(outside) > 50                           # the target shows only in its span
        text = probe.target_text(s, (synth.SIZE, synth.SIZE))
        assert text == f"From <t>{D.format_seconds(start)}</t>s to <t>{D.format_seconds(end)}</t>s"
        assert probe.score(s, text, (synth.SIZE, synth.SIZE)) == {"parsed": True, "iou": 1.0}
        checked += 1
    asked = [probe.make_sample(rng, probe.ProbeConfig(when_events="stop,meet"), "when", 0).question for _ in range(8)]
    kinds = {"stop" if q.endswith("stop moving?") else "meet" if " touch the " in q else q for q in asked}
    assert kinds == {"stop", "meet"}                                     # only the events asked for
    with pytest.raises(SystemExit, match="--when_events"):
        probe.parse_args(["--when_events=stop,jump"])
    with pytest.raises(SystemExit, match="--when_events=.jump"):
        probe.make_sample(rng, probe.ProbeConfig(when_events="jump"), "when", 0)
    assert checked == 6


def test_when_scoring_by_hand():
    s = probe.Sample("when", None, "q", "red circle", [0, 0, 1, 1], span=(2.5, 4.0))
    assert probe.score(s, "From <t>2.5</t>s to <t>5.5</t>s", None) == {"parsed": True, "iou": 0.5}
    assert probe.score(s, "From <t>3.0</t>s to <t>3.5</t>s", None) == {"parsed": True, "iou": pytest.approx(1 / 3)}
    assert probe.score(s, "From <t>5.0</t>s to <t>6.0</t>s", None) == {"parsed": True, "iou": 0.0}
    assert probe.score(s, "From <t>4.0</t>s to <t>2.5</t>s", None) == {"parsed": False, "iou": 0.0}   # inverted
    assert probe.score(s, "<obj>red circle</obj> at <t>2.5</t>s", None) == {"parsed": False, "iou": 0.0}


def test_when_trace_answer_is_the_tg_trace_and_is_scored_on_its_answer_block():
    cfg = probe.ProbeConfig(when_weight=1.0, find_weight=0, marked_weight=0, when_events="appear", when_answer="trace")
    s = probe.make_sample(random.Random(3), cfg, "when", 0)
    text = probe.target_text(s, [112, 112])
    parsed = rewards.parse_completion(text)
    assert parsed.well_formed and len(parsed.claims) == 2
    assert parsed.think_times == list(s.span)                        # a claim at the span's start, one at its end
    assert [c.name for c in parsed.claims] == [s.name, s.name]
    assert rewards.parse_span(parsed.answer) == s.span
    assert probe.score(s, text, None) == {"parsed": True, "iou": 1.0}
    assert probe.score(s, text.replace("</answer>", ""), None)["parsed"] is False   # no answer block, no span
    span = probe.make_sample(random.Random(3), probe.ProbeConfig(when_weight=1.0, find_weight=0, marked_weight=0,
                                                                 when_events="appear"), "when", 0)
    assert span.span == s.span and span.trace is None
    assert probe.target_text(span, [112, 112]) == synth.span_text(*s.span)
    with pytest.raises(SystemExit, match="--when_answer"):
        probe.parse_args(["--when_answer=words"])


def test_qa_trace_answer_is_the_free_form_records_trace_and_is_scored_on_its_answer_block():
    cfg = probe.ProbeConfig(qa_weight=1.0, find_weight=0, marked_weight=0, qa_events="colour", qa_answer="trace")
    s = probe.make_sample(random.Random(5), cfg, "qa", 0)
    text = probe.target_text(s, [112, 112])
    parsed = rewards.parse_completion(text)
    assert parsed.well_formed and len(parsed.claims) == 2 and parsed.answer == s.answer
    before, after = (c.name for c in parsed.claims)        # the object as it looks before the change, then after
    assert before.split()[1] == after.split()[1] and after.split()[0] == s.answer != before.split()[0]
    assert probe.score(s, text, None) == {"parsed": True, "correct": 1.0}
    assert probe.score(s, text.replace(f"<answer>{s.answer}", "<answer>grey"), None)["correct"] == 0.0
    alone = probe.make_sample(random.Random(5), dataclasses.replace(cfg, qa_answer="answer"), "qa", 0)
    assert alone.answer == s.answer and alone.trace is None
    assert probe.target_text(alone, [112, 112]) == f"<answer>{s.answer}</answer>"
    assert probe.answer_tokens(cfg) > 100 > probe.answer_tokens(dataclasses.replace(cfg, qa_answer="answer"))
    with pytest.raises(SystemExit, match="--qa_answer"):
        probe.parse_args(["--qa_answer=words"])


def test_qa_sample_asks_synths_question_and_its_answer_is_what_the_frames_show():
    cfg = probe.ProbeConfig(qa_weight=1.0, qa_events="colour")
    rng = random.Random(7)
    for _ in range(5):
        s = probe.make_sample(rng, cfg, "qa", 0)
        frames, times, duration, _ = s.clip
        assert times == D.sample_times(duration) and len(frames) == len(times) and s.event == "colour"
        assert s.question == f"What colour does the {s.name} turn into?"     # synth's question for a colour event
        assert s.answer in synth.COLOURS and s.answer != s.name.split()[0]
        colour = torch.tensor(synth.COLOURS[s.answer], dtype=torch.uint8)[:, None, None]
        count = [int((f == colour).all(0).sum()) for f in frames]
        start, end = s.span
        inside = [c for c, t in zip(count, times) if start <= t < end]
        outside = [c for c, t in zip(count, times) if not start <= t <= end]
        assert min(inside) - max(outside) > 50                   # the answer's colour is the target's in its span
        text = probe.target_text(s, (synth.SIZE, synth.SIZE))
        assert text == f"<answer>{s.answer}</answer>"
        assert probe.score(s, text, None) == {"parsed": True, "correct": 1.0}
        assert [times[k] for k, _ in s.keys] == [start]          # the trace's key frame at the change, not before
        x1, y1, x2, y2 = (round(v) for v in D.norm_box_to_pixels(s.keys[0][1], synth.SIZE, synth.SIZE, rounded=False))
        assert int((frames[s.keys[0][0], :, y1:y2, x1:x2] == colour).all(0).sum()) > 50   # the key box shows it
    wrong = next(c for c in synth.COLOURS if c != s.answer)
    assert probe.score(s, f"<answer>{wrong}</answer>", None) == {"parsed": True, "correct": 0.0}
    assert probe.score(s, s.answer, None) == {"parsed": False, "correct": 0.0}   # no answer block, no credit
    meet = probe.make_sample(rng, probe.ProbeConfig(qa_events="meet"), "qa", 0)
    assert meet.keys and all(box != meet.box for _, box in meet.keys)    # the key object is the one touched
    events = {probe.make_sample(rng, probe.ProbeConfig(qa_events="stop,turn"), "qa", 0).event for _ in range(10)}
    assert events == {"stop", "turn"}                                     # only the events asked for
    with pytest.raises(SystemExit, match="--qa_events"):
        probe.parse_args(["--qa_events=stop,jump"])
    with pytest.raises(SystemExit, match="--qa_events"):
        probe.make_sample(rng, probe.ProbeConfig(qa_events="jump"), "qa", 0)


def test_qa_curriculum_grows_the_clip_from_the_key_frames_to_every_frame():
    cfg = probe.ProbeConfig(qa_weight=1.0, find_weight=0, marked_weight=0, qa_events="colour", qa_curriculum_steps=100)
    first = probe.training_sample(random.Random(3), cfg, 0)
    start = first.span[0]
    assert first.clip[1] == [start - 0.5, start]          # a colour trace's two key frames: before and at the change
    assert [first.clip[1][k] for k, _ in first.keys] == [start]
    mid = probe.training_sample(random.Random(3), cfg, 50)
    assert start - 0.5 in mid.clip[1] and start in mid.clip[1] and len(mid.clip[1]) == 1 + 50 * 15 // 100
    assert mid.clip[1] == sorted(mid.clip[1])
    last = probe.training_sample(random.Random(3), cfg, 100)
    assert last.clip[1] == D.sample_times(last.clip[2])     # every frame from the curriculum's end


def test_letter_sample_is_an_mcq_records_trace_cut_before_its_letter(tiny_data, tiny_policy):
    _, tok, vision = tiny_policy
    cfg = probe.ProbeConfig(letter_weight=1.0, find_weight=0, marked_weight=0)
    rng, events = random.Random(8), set()
    for _ in range(25):
        s = probe.training_sample(rng, cfg, 0)
        assert s.task == "letter" and s.lead.startswith("<think>") and s.lead.endswith(f". {synth.MCQ_LEAD}")
        frames, times, duration, _ = s.clip
        assert times == D.sample_times(duration) and len(frames) == len(times)   # the whole clip, as SFT shows it
        options = dict(line.split(". ", 1) for line in s.question.split("\nOptions:\n")[1].split("\n"))
        assert sorted(options) == list("ABCD") and s.answer in options
        last = s.lead.rsplit("So ", 1)[1]                   # "the red circle stops. That is option"
        named = [k for k, o in options.items() if re.search(rf"\b{o}\b", last)]
        assert named == [s.answer], (last, options)         # the trace's words name exactly the right option
        assert s.trace == f" {s.answer}.</think><answer>{s.answer}</answer>"
        full = rewards.parse_completion(s.lead + s.trace)
        assert full.well_formed and full.answer == s.answer and len(full.claims) >= 1
        events.add(s.event)
    assert events == set(synth.EVENTS)
    # the cut is where an MCQ record of the synthetic set has it: what follows is the same shape
    records = [r for r in json.load(open(os.path.join(tiny_data, "train.json"))) if r["task"] == synth.TASKS["mcq"]]
    for r in records:
        rest = r["reasoning_process"].split(synth.MCQ_LEAD)[-1]
        assert rest == f" {r['answer']}.</think><answer>{r['answer']}</answer>"
    # in SFT's layout the prompt ends with the given words and the target is the rest
    prompt, target = probe.encode(s, tok, vision, "question_first", layout="both")
    lead = M.encode_text(tok, s.lead)
    assert prompt.input_ids[-len(lead):].tolist() == lead
    assert tok.decode(prompt.input_ids).count(s.question) == 2
    assert target.tolist() == M.encode_text(tok, s.trace) + [tok.convert_tokens_to_ids(D.IM_END)]
    # scored right only when the trace's letter and the answer are both the named option's
    wrong = next(k for k in "ABCD" if k != s.answer)
    assert probe.score(s, s.trace, None) == {"parsed": True, "correct": 1.0}
    assert probe.score(s, s.trace.replace(f" {s.answer}.", f" {wrong}.", 1), None)["correct"] == 0.0
    assert probe.score(s, s.trace.replace(f">{s.answer}<", f">{wrong}<"), None)["correct"] == 0.0
    assert probe.score(s, f" {s.answer}.</think>", None) == {"parsed": False, "correct": 0.0}


def test_blind_answer_is_each_events_most_common_answer_by_hand():
    qa = lambda event, answer: probe.Sample("qa", None, "q", "red circle", [0, 0, 1, 1], answer=answer, event=event)
    # turn: left twice, up once -> left scores 2 of 3; colour: blue, green -> a tie, 1 of 2 either way
    samples = [qa("turn", "left"), qa("turn", "up"), qa("turn", "left"), qa("colour", "blue"), qa("colour", "green")]
    assert probe.blind_answer(samples) == pytest.approx(3 / 5)
    assert probe.blind_answer(samples + [probe.Sample("find", None, "q", "red circle", [0, 0, 1, 1])]) == \
        pytest.approx(3 / 5)                                              # frames are not qa clips
    assert probe.blind_answer([probe.Sample("find", None, "q", "red circle", [0, 0, 1, 1])]) is None


def test_evaluation_reports_qa_accuracy_per_event(tiny_policy, monkeypatch):
    vlm, tok, vision = tiny_policy
    rng = random.Random(2)
    samples = [probe.make_sample(rng, probe.ProbeConfig(qa_events=e), "qa", 0) for e in ("turn", "turn", "colour")]
    said = [f"<answer>{samples[0].answer}</answer>", "<answer>nowhere</answer>", f"<answer>{samples[2].answer}</answer>"]

    def answers(vlm, inputs, group, how, generator, batch):   # the model "says" each text above, in order
        assert len(inputs) == len(said)
        ids = [torch.tensor([tok.encode(t, add_special_tokens=False)]) for t in said]
        return [(i, torch.ones_like(i, dtype=torch.bool), None) for i in ids]
    monkeypatch.setattr(probe.model, "generate_groups", answers)
    m = probe.evaluate(vlm, tok, vision, samples, "question_first", layout="before")
    assert m["qa_acc"] == pytest.approx(2 / 3)
    assert (m["qa_acc[turn]"], m["qa_acc[colour]"]) == (0.5, 1.0)


def test_evaluation_reports_letter_accuracy(tiny_policy, monkeypatch):
    vlm, tok, vision = tiny_policy
    rng = random.Random(4)
    samples = [probe.make_sample(rng, probe.ProbeConfig(), "letter", 0) for _ in range(4)]
    other = lambda s: next(k for k in "ABCD" if k != s.answer)
    said = [samples[0].trace, samples[1].trace.replace(f">{samples[1].answer}<", f">{other(samples[1])}<"),
            samples[2].trace, f" {other(samples[3])}.</think><answer>{other(samples[3])}</answer>"]

    def answers(vlm, inputs, group, how, generator, batch):   # the model "says" each text above, in order
        ids = [torch.tensor([tok.encode(t, add_special_tokens=False)]) for t in said]
        return [(i, torch.ones_like(i, dtype=torch.bool), None) for i in ids]
    monkeypatch.setattr(probe.model, "generate_groups", answers)
    assert probe.evaluate(vlm, tok, vision, samples, "question_first", layout="both")["letter_acc"] == 0.5


@pytest.mark.parametrize("said, truth, expected", [
    ("red circle", "red circle", (1.0, 1.0)), ("red square", "red circle", (1.0, 0.0)),
    ("blue circle", "red circle", (0.0, 1.0)), ("circle", "red circle", (0.0, 1.0)),
    ("red", "red circle", (1.0, 0.0)), ("", "red circle", (0.0, 0.0)), (None, "red circle", (0.0, 0.0)),
    ("circle red", "red circle", (0.0, 0.0)), ("red circle", "left", None), ("red", "red", None),
])
def test_name_parts_scores_an_objects_colour_and_kind_apart(said, truth, expected):
    assert probe.name_parts(said, truth) == expected


def test_evaluation_splits_names_into_colour_and_kind(tiny_policy, monkeypatch):
    """Marked answers and qa answers that are object names are scored word by word as well."""
    vlm, tok, vision = tiny_policy
    rng = random.Random(3)
    marked = [probe.make_sample(rng, probe.ProbeConfig(), "marked", 0) for _ in range(2)]
    appear = [probe.make_sample(rng, probe.ProbeConfig(qa_events="appear"), "qa", 0) for _ in range(2)]
    turn = probe.make_sample(rng, probe.ProbeConfig(qa_events="turn"), "qa", 0)
    colour, kind = marked[1].name.split()
    other_kind = next(k for k in probe.synth.KINDS if k != kind)
    a_colour, a_kind = appear[0].answer.split()
    other_colour = next(c for c in probe.synth.COLOURS if c != a_colour)
    said = [f"<obj>{marked[0].name}</obj>", f"<obj>{colour} {other_kind}</obj>",     # marked: right, colour only
            f"<answer>{other_colour} {a_kind}</answer>", "<answer>nothing</answer>",  # appear: kind only, neither
            f"<answer>{turn.answer}</answer>"]                                       # turn: not a name

    def answers(vlm, inputs, group, how, generator, batch):   # the model "says" each text above, in order
        ids = [torch.tensor([tok.encode(t, add_special_tokens=False)]) for t in said]
        return [(i, torch.ones_like(i, dtype=torch.bool), None) for i in ids]
    monkeypatch.setattr(probe.model, "generate_groups", answers)
    m = probe.evaluate(vlm, tok, vision, marked + appear + [turn], "question_first", layout="before")
    assert (m["marked_acc"], m["marked_colour_acc"], m["marked_kind_acc"]) == (0.5, 1.0, 0.5)
    assert (m["qa_acc"], m["qa_colour_acc"], m["qa_kind_acc"]) == (pytest.approx(1 / 3), 0.0, 0.5)


def test_frozen_held_out_clips_show_their_first_frame_throughout():
    cfg = probe.ProbeConfig(qa_weight=1.0, qa_events="appear", eval_frames=2)
    drawn, still = probe.held_out(cfg), probe.held_out(dataclasses.replace(cfg, eval_frozen=True))
    for a, b in zip(drawn, still):
        assert (a.task, a.question, a.answer) == (b.task, b.question, b.answer)
        if a.clip is None:
            assert torch.equal(a.frame, b.frame)
            continue
        assert b.clip[0].shape == a.clip[0].shape and b.clip[1:] == a.clip[1:]
        assert all(torch.equal(f, a.clip[0][0]) for f in b.clip[0])
        assert not all(torch.equal(f, a.clip[0][0]) for f in a.clip[0])  # an appear clip does change


def test_evaluation_decodes_enough_tokens_for_a_whole_when_answer(tiny_policy):
    _, tok, _ = tiny_policy
    for answer in ("trace", "span"):
        cfg = probe.ProbeConfig(when_weight=1.0, when_events="stop,turn,colour,appear,meet", when_answer=answer)
        rng = random.Random(5)
        longest = max(len(tok.encode(probe.target_text(probe.make_sample(rng, cfg, "when", 0), [112, 112]) + D.IM_END,
                                     add_special_tokens=False)) for _ in range(40))
        assert longest <= probe.answer_tokens(cfg), (answer, longest)   # a truncated answer would score 0


def test_blind_span_is_the_best_constant_answer_by_hand():
    def clip(a, b):   # only the span and the clip's duration (4 s) matter
        return probe.Sample("when", None, "q", "red circle", [0, 0, 1, 1], clip=(None, None, 4.0, None), span=(a, b))
    # on a 1 s grid: (1, 3) scores (1 + 1 + 1/3) / 3; (1, 4) 2/3; (2, 4) (1/3 + 1/3 + 1) / 3; (2, 3) 1/2
    assert probe.blind_span([clip(1, 3), clip(1, 3), clip(2, 4)], grid_s=1.0) == (pytest.approx(7 / 9), 1.0, 3.0)
    # the grid bounds the yardstick: (1.5, 2.5) is on a 0.5 s grid; on a 1 s grid the best is (1, 3), tIoU 1/2
    assert probe.blind_span([clip(1.5, 2.5)], grid_s=0.5) == (pytest.approx(1.0), 1.5, 2.5)
    assert probe.blind_span([clip(1.5, 2.5)], grid_s=1.0) == (pytest.approx(0.5), 1.0, 3.0)
    frames = probe.Sample("find", None, "q", "red circle", [0, 0, 1, 1])
    assert probe.blind_span([frames]) is None   # no when clip, no yardstick


def test_at_sample_is_read_in_the_sft_layout(tiny_policy):
    vlm, tok, vision = tiny_policy
    s = probe.make_sample(random.Random(4), probe.ProbeConfig(at_weight=1.0), "at", 0)
    frames, times, duration, _ = s.clip
    prompt, target = probe.encode(s, tok, vision, "short")
    expected = M.tokenize_prompt(tok, D.render_prompt(s.question, times, duration), frames, vision)
    assert torch.equal(prompt.input_ids, expected.input_ids)
    assert prompt.image_grid_thw.shape[0] == len(times)
    assert tok.decode(target).startswith(f"<obj>{s.name}</obj><box>")


def test_at_question_first_moves_only_the_question_before_the_frames():
    times, q = [0.0, 0.5, 1.0], "Where is the red circle at 0.5s?"
    sft, first = D.render_prompt(q, times, 1.5), D.render_prompt(q, times, 1.5, question_at="before")
    frames_at = lambda parts: [i for i, p in enumerate(parts) if isinstance(p, int)]
    asked = lambda parts: next(i for i, p in enumerate(parts) if isinstance(p, str) and q in p)
    assert asked(sft) > max(frames_at(sft)) and asked(first) < min(frames_at(first))
    assert "".join(p for p in first if isinstance(p, str)).replace(q + "\n", "") == \
        "".join(p for p in sft if isinstance(p, str)).replace("\n" + q, "")
    assert [p for p in first if not isinstance(p, str) or isinstance(p, D.Special)] == \
        [p for p in sft if not isinstance(p, str) or isinstance(p, D.Special)]


def test_at_curriculum_grows_the_clip_from_the_asked_frame_alone_to_every_frame():
    cfg = probe.ProbeConfig(find_weight=0, marked_weight=0, at_weight=1.0, at_curriculum_steps=30)
    rng = random.Random(6)
    for step, most in ((0, 1), (2, 2), (15, 8), (29, 15), (30, 16), (500, 16)):
        s = probe.training_sample(rng, cfg, step)
        frames, times, duration, t = s.clip
        full = D.sample_times(duration)
        assert len(times) == min(most, len(full)) == len(frames)
        assert t in times and set(times) <= set(full) and times == sorted(times)
        assert torch.equal(frames[times.index(t)], s.frame)


def test_when_curriculum_grows_the_clip_from_the_spans_two_ends_to_every_frame():
    cfg = probe.ProbeConfig(find_weight=0, marked_weight=0, when_weight=1.0, when_events="appear",
                            when_curriculum_steps=28)
    rng = random.Random(8)
    for step, most in ((0, 2), (2, 3), (14, 9), (27, 15), (28, 16), (400, 16)):
        s = probe.training_sample(rng, cfg, step)
        frames, times, duration, _ = s.clip
        full = D.sample_times(duration)
        assert len(times) == min(most, len(full)) == len(frames)
        assert set(times) <= set(full) and times == sorted(times)
        assert s.span[0] in times and s.span[1] in times                 # the answer stays readable
        colour = torch.tensor(synth.COLOURS[s.name.split()[0]], dtype=torch.uint8)[:, None, None]
        count = [int((f == colour).all(0).sum()) for f in frames]
        assert min(count[times.index(t)] for t in s.span) > 50           # and those frames show the target


def test_time_rows_table():
    # ids: 5 <t> 7 8 </t> 9 <t> 10 </t> 11, <t> = 1, </t> = 2; the first tag's tokens go with frame 3,
    # the second's with frame 6; a third tag has no frame and is left out
    ids = [5, 1, 7, 8, 2, 9, 1, 10, 2, 11, 1, 12, 2]
    assert probe.time_rows(ids, 1, 2, [3, 6]) == [(2, 3), (3, 3), (7, 6)]
    assert probe.time_rows([5, 9], 1, 2, [3, 6]) == []
    # a trace (box_id 4): <box> 20 21 </box>=22 at=23 <t> 7 </t> . <box> 30 </box> <t> 8 </t> then the answer's
    # <t> 9 </t> <t> 10 </t>: each claim's box joins its time's group; frames [3, 6, 3, 6]
    trace = [4, 20, 21, 22, 23, 1, 7, 2, 40, 4, 30, 22, 1, 8, 2, 1, 9, 2, 1, 10, 2]
    assert probe.time_rows(trace, 1, 2, [3, 6, 3, 6], box_id=4) == [
        (1, 3), (2, 3), (3, 3), (4, 3), (6, 3), (10, 6), (11, 6), (13, 6), (16, 3), (19, 6)]
    assert probe.time_rows(trace, 1, 2, [3, 6, 3, 6]) == [(6, 3), (13, 6), (16, 3), (19, 6)]   # times alone


def test_when_attend_loss_hand_computed():
    # Two frames of 2 x 2 cells at positions 2..5 and 6..9 of an 11-token prompt; the answer
    # "<t> 7 </t> <t> 8 9 </t>" (ids 1 7 2 1 8 9 2) is predicted from positions 10..16: token 7
    # (answer index 1) from 11, 8 and 9 (indices 4, 5) from 14 and 15. Span (0.0, 1.0) on the shown
    # times (0.0, 1.0): the start time reads frame 0, the end time frame 1.
    types = torch.tensor([[0, 0] + [1] * 8 + [0] * 7])
    attn = torch.full((1, 1, 17, 17), 0.0)
    attn[0, 0, 11, 2:6] = 0.1          # start time -> frame 0: mass 0.4
    attn[0, 0, 14, 6:10] = 0.2         # end time -> frame 1: mass 0.8
    attn[0, 0, 15, 6:10] = 0.05        #                      mass 0.2
    out = SimpleNamespace(hidden_states=None, attentions=[attn])
    cfg = probe.ProbeConfig(attend_weight=3.0, attend_layer=1)
    sample = probe.Sample("when", None, "", "red circle", [0, 0, 1, 1], clip=(None, [0.0, 1.0], 1.5, None),
                          span=(0.0, 1.0))
    batch = [(_Prompt(11, [1, 4, 4]), torch.tensor([1, 7, 2, 1, 8, 9, 2]))]
    loss, stats = probe.binding_loss(out, types, batch, [sample], None, cfg, merge=2, time_tags=(1, 2, 3))
    nll = -(math.log(0.4) + math.log(0.8) + math.log(0.2)) / 3
    assert stats["attend_nll"] == pytest.approx(nll, rel=1e-5)
    assert loss.item() == pytest.approx(3.0 * nll, rel=1e-5)
    loss, stats = probe.binding_loss(out, types, batch, [sample], None, cfg, merge=2)   # no tags: no when aid
    assert loss == 0.0 and stats["attend_nll"] == 0.0


def test_qa_attend_loss_hand_computed():
    # Two frames of 2 x 2 cells (112 x 112 px) at positions 2..5 and 6..9 of an 11-token prompt; a
    # 3-token answer predicted from positions 10, 11, 12. The answer's object is in frame 0's cell 1
    # (top right: position 3) and in frame 1's cell 2 (bottom left: position 8).
    types = torch.tensor([[0, 0] + [1] * 8 + [0] * 4])
    attn = torch.zeros((1, 1, 14, 14))
    attn[0, 0, 10, 3], attn[0, 0, 10, 8] = 0.3, 0.2     # mass 0.5
    attn[0, 0, 11, 3], attn[0, 0, 11, 4] = 0.1, 0.9     # mass 0.1 (frame 0's cell 2 is not the object's)
    attn[0, 0, 12, 8] = 0.8                             # mass 0.8
    out = SimpleNamespace(hidden_states=None, attentions=[attn])
    cfg = probe.ProbeConfig(attend_weight=2.0, attend_layer=1)
    sample = probe.Sample("qa", None, "", "red circle", [0, 0, 1, 1], answer="blue", event="colour",
                          keys=[(0, [0.6, 0.1, 0.9, 0.4]), (1, [0.1, 0.6, 0.4, 0.9])])
    batch = [(_Prompt(11, [1, 4, 4]), torch.tensor([5, 6, 7]))]
    loss, stats = probe.binding_loss(out, types, batch, [sample], None, cfg, merge=2)
    nll = -(math.log(0.5) + math.log(0.1) + math.log(0.8)) / 3
    assert stats["attend_nll"] == pytest.approx(nll, rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * nll, rel=1e-5)


def _tracks():
    # Three shown frames of a clip, objects in scene order (A is the target): A moves right and is
    # recoloured at frame 2; B stands still; C is away at frame 0, appears at frame 1, jumps to the
    # bottom-left cell.
    a = [("red circle", [0.1, 0.1, 0.3, 0.3]), ("red circle", [0.15, 0.1, 0.35, 0.3]), ("yellow circle", [0.2, 0.1, 0.4, 0.3])]
    b = [("blue square", [0.6, 0.6, 0.8, 0.8])] * 3
    c = [None, ("green triangle", [0.6, 0.1, 0.8, 0.3]), ("green triangle", [0.1, 0.6, 0.3, 0.8])]
    return [[a[k], b[k], c[k]] for k in range(3)]


def test_motion_targets_hand_computed_table():
    cls, box, move, moved, fresh, source = probe.motion_targets(_tracks(), 2, 2)   # 2 x 2 cells a frame: 12 cells
    name = {n: probe.NAME_INDEX[n] for n in ("red circle", "yellow circle", "blue square", "green triangle")}
    none = len(probe.NAMES)
    assert cls.tolist() == [name["red circle"], none, none, name["blue square"],
                            name["red circle"], name["green triangle"], none, name["blue square"],
                            name["yellow circle"], none, name["green triangle"], name["blue square"]]
    assert box[10].tolist() == pytest.approx([0.1, 0.6, 0.3, 0.8]) and box[2].tolist() == [0, 0, 0, 0]
    assert fresh.tolist() == [False] * 4 + [True, True, False, True] + [True, False, True, True]  # a frame before
    assert moved.tolist() == [False] * 4 + [True, False, False, True] + [True, False, True, True]  # C new at frame 1
    assert source.tolist() == [-1] * 4 + [0, -1, -1, 3] + [4, -1, 5, 7]           # the object's cell a frame before
    table = {  # cell: dx, dy, still, new, recoloured
        4: (0.05, 0.0, 0, 0, 0), 5: (0, 0, 0, 1, 0), 7: (0, 0, 1, 0, 0),
        8: (0.05, 0.0, 0, 0, 1), 10: (-0.5, 0.5, 0, 0, 0), 11: (0, 0, 1, 0, 0)}
    for cell in range(12):
        assert move[cell].tolist() == pytest.approx(table.get(cell, (0, 0, 0, 0, 0)), abs=1e-6), cell
    # two objects in one cell: the earlier one in scene order (the target) owns it
    shared = [[("red circle", [0.1, 0.1, 0.3, 0.3]), ("blue square", [0.05, 0.05, 0.25, 0.25])]]
    assert probe.motion_targets(shared, 2, 2)[0][0] == name["red circle"]


def test_motion_loss_hand_computed_and_in_the_binding_loss():
    # Zero head outputs: uniform class logits (log 13 on all 12 cells), zero boxes (L1 x 10 = 10 x the
    # mean box coordinate over the 8 owned cells), logits of 0 (log 2 each for new, still, recoloured),
    # zero displacements (L1 x 10 = 10 x the mean |dx|, |dy| over the 5 moved cells).
    tracks = _tracks()
    o = torch.zeros(12, probe.AUX_OUT + probe.MOTION_OUT)
    boxes = [  # the owned cells' boxes, frame by frame
             [0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.8, 0.8], [0.15, 0.1, 0.35, 0.3], [0.6, 0.1, 0.8, 0.3],
             [0.6, 0.6, 0.8, 0.8], [0.2, 0.1, 0.4, 0.3], [0.1, 0.6, 0.3, 0.8], [0.6, 0.6, 0.8, 0.8]]
    mean_box = sum(sum(b) for b in boxes) / 32
    mean_move = (0.05 + 0.0 + 0.05 + 0.5 + 0.5) / 10   # |dx|, |dy| of cells 4, 7, 8, 10, 11
    want = math.log(13) + 10 * mean_box + math.log(2) + 10 * mean_move + 2 * math.log(2)
    loss, track, stats = probe.motion_loss(o, tracks, 2, 2)
    assert loss.item() == pytest.approx(want, rel=1e-5) and track == 0.0
    assert (stats["still"], stats["still_hits"], stats["going"], stats["going_hits"]) == (2, 0, 3, 3)  # 0 reads "moving"
    # in the binding loss: a clip's image tokens (positions 2..13, frames in order) through the bind head
    types = torch.tensor([[0, 0] + [1] * 12 + [0] * 3])
    out = SimpleNamespace(hidden_states=[None, torch.zeros(1, 17, 8)], attentions=None)
    head = torch.nn.Linear(8, probe.AUX_OUT + probe.MOTION_OUT)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    cfg = probe.ProbeConfig(motion_weight=2.0, bind_layer=1)
    sample = probe.Sample("qa", None, "", "red circle", [0.1, 0.1, 0.3, 0.3], tracks=tracks)
    batch = [(_Prompt(14, [1, 4, 4]), torch.zeros(3, dtype=torch.long))]
    loss, stats = probe.binding_loss(out, types, batch, [sample], head, cfg, merge=2)
    assert loss.item() == pytest.approx(2.0 * want, rel=1e-5)
    assert stats["still_bacc"] == pytest.approx(0.5) and stats["move_l1"] == pytest.approx(mean_move)
    loss.backward()
    assert head.bias.grad[probe.AUX_OUT:].abs().sum() > 0          # the motion outputs learn
    cfg = probe.ProbeConfig(bind_layer=1, bind_weight=1.0)            # motion off: the clip gets no bind loss
    assert probe.binding_loss(out, types, batch, [sample], head, cfg, merge=2)[0] == 0.0


def test_track_aid_hand_computed():
    # The moved cells of _tracks (4, 7, 8, 10, 11) and where their objects were a frame before (0, 3,
    # 4, 5, 7): the head's weight there is 0.5, 0.25, 1.0, 0.5, 0.125, elsewhere anything.
    attn = torch.full((12, 12), 0.01)
    for cell, before, w in [(4, 0, 0.5), (7, 3, 0.25), (8, 4, 1.0), (10, 5, 0.5), (11, 7, 0.125)]:
        attn[cell, before] = w
    o = torch.zeros(12, probe.AUX_OUT + probe.MOTION_OUT)
    _, track, _ = probe.motion_loss(o, _tracks(), 2, 2, attn)
    assert track.item() == pytest.approx(-sum(map(math.log, (0.5, 0.25, 1.0, 0.5, 0.125))) / 5, rel=1e-5)
    # in the binding loss, head 0 of track_layer among the clip's image tokens (positions 2..13), x weight
    full = torch.zeros(1, 2, 17, 17)
    full[0, 0, 2:14, 2:14] = attn
    out = SimpleNamespace(hidden_states=[None, torch.zeros(1, 17, 8)], attentions=[full])
    head = torch.nn.Linear(8, probe.AUX_OUT + probe.MOTION_OUT)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    sample = probe.Sample("qa", None, "", "red circle", [0.1, 0.1, 0.3, 0.3], tracks=_tracks())
    batch = [(_Prompt(14, [1, 4, 4]), torch.zeros(3, dtype=torch.long))]
    types = torch.tensor([[0, 0] + [1] * 12 + [0] * 3])
    without = probe.binding_loss(out, types, batch, [sample], head, probe.ProbeConfig(motion_weight=1.0, bind_layer=1), merge=2)[0]
    cfg = probe.ProbeConfig(motion_weight=1.0, bind_layer=1, track_weight=3.0, track_layer=1)
    loss, stats = probe.binding_loss(out, types, batch, [sample], head, cfg, merge=2)
    assert loss.item() == pytest.approx(without.item() + 3.0 * track.item(), rel=1e-5)
    assert stats["track_nll"] == pytest.approx(track.item(), rel=1e-5)
    with pytest.raises(SystemExit, match="track_weight"):
        probe.parse_args(["--track_weight=1"])                       # no motion targets to track


def test_a_drawn_clip_tracks_its_scene_and_the_stop_target_stands_still_in_its_span():
    cfg = probe.ProbeConfig(qa_weight=1.0, qa_events="stop")
    s = probe.qa_sample(random.Random(3), cfg)
    times = s.clip[1]
    assert len(s.tracks) == len(times) and s.tracks[0][0][0] == s.answer      # the target first, by its name
    _, _, move, moved, _, _ = probe.motion_targets(s.tracks, 4, 4)
    still = {k for k in range(len(times)) for c in range(16) if moved[k * 16 + c] and move[k * 16 + c, 2] > 0}
    inside = {k for k, t in enumerate(times) if s.span[0] < t <= s.span[1]}
    assert still == inside                    # still exactly on the shown frames after the stop began


def test_balanced_bce_weighs_the_rare_class_as_much_as_the_common_one():
    logits, targets = torch.tensor([0.0, 0.0, 0.0, 2.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])
    negatives = (2 * math.log(2) + math.log(1 + math.exp(2))) / 3                 # -log(1 - sigmoid(x))
    assert probe.balanced_bce(logits, targets).item() == pytest.approx((math.log(2) + negatives) / 2, rel=1e-6)
    assert probe.balanced_bce(logits[1:], targets[1:]).item() == pytest.approx(negatives, rel=1e-6)  # one class


@pytest.mark.parametrize("key_len", [1, 2])
def test_recall_sample_asks_each_query_about_an_entry(tiny_policy, key_len):
    _, tok, _ = tiny_policy
    symbols, marks = probe.recall_alphabet(tok, 16)
    dot, ask, nl = marks
    assert len(symbols) == 16 and not set(marks) & set(symbols) and not set(tok.all_special_ids) & set(symbols)
    assert [tok.decode([m]) for m in marks] == [".", "?", "\n"]
    w = key_len + 3                                                        # an entry's and a query's length
    rng, orders, shared = random.Random(0), set(), 0
    for _ in range(60):
        ids, queries = probe.recall_sample(rng, symbols, marks, key_len)
        n = len(queries)
        assert 3 <= n <= 8 and len(ids) == 2 * w * n
        entries = [ids[w * e:w * e + w] for e in range(n)]
        value_first = queries[0][1] % w == 0                               # the first query's value opens its entry
        orders.add(value_first)
        assert all(e[1 if value_first else key_len] == dot and e[-1] == nl for e in entries)
        table = {(tuple(e[2:-1]), e[0]) if value_first else (tuple(e[:key_len]), e[-2]) for e in entries}
        assert len({k for k, _ in table}) == n and len({v for _, v in table}) == n   # distinct keys and values
        shared += len({s for k, _ in table for s in k}) < key_len * n      # some symbol in two keys
        for q, (at, source, value) in enumerate(queries):
            start = w * n + w * q
            assert at == start + key_len and ids[at] == ask and ids[at + 1] == value and ids[at + 2] == nl
            assert (tuple(ids[start:at]), value) in table and ids[source] == value  # the value the key's entry holds
            assert source % w == (0 if value_first else key_len + 1)         # at the value's place in its entry
    assert orders == {True, False}
    assert (shared > 20) == (key_len == 2)                                 # two-symbol keys can share one
    with pytest.raises(SystemExit, match="recall_symbols"):
        probe.parse_args(["--recall_symbols=7"])                          # fewer than 8 distinct keys
    with pytest.raises(SystemExit, match="recall_key_len"):
        probe.parse_args(["--recall_key_len=4"])
    with pytest.raises(SystemExit, match="ordinary tokens"):
        probe.recall_alphabet(tok, len(tok))                              # more than the tokenizer holds


class _Oracle(torch.nn.Module):
    """A stand-in model whose logits give the next token (10 above the rest) and whose attention is
    uniform over each position's past: recall_loss's numbers can then be worked out by hand."""
    vocab = 50

    def forward(self, input_ids, attention_mask, use_cache, output_attentions):
        B, L = input_ids.shape
        logits = torch.zeros(B, L, self.vocab)
        logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 10.0)
        causal = torch.tril(torch.ones(L, L))
        heads = (causal / causal.sum(1, keepdim=True)).expand(B, 2, L, L)
        return SimpleNamespace(logits=logits, attentions=[heads, heads] if output_attentions else None)


def test_recall_loss_by_hand():
    symbols, marks = list(range(10, 30)), [1, 2, 3]
    seqs = [probe.recall_sample(random.Random(k), symbols, marks) for k in range(3)]
    nll, aid, right = probe.recall_loss(_Oracle(), seqs, 0, "cpu", attend_layer=2)
    queries = [q for _, qs in seqs for q in qs]
    assert right.tolist() == [True] * len(queries)
    assert nll.item() == pytest.approx(math.log(1 + 49 * math.exp(-10)), rel=1e-4)
    # uniform attention from position a over its a + 1 visible positions: -log 1/(a+1)
    assert aid.item() == pytest.approx(sum(math.log(a + 1) for a, _, _ in queries) / len(queries), rel=1e-5)
    assert probe.recall_loss(_Oracle(), seqs, 0, "cpu")[1] is None                 # no aid asked
    wrong = [(ids, [(a + 1, s, v) for a, s, v in qs]) for ids, qs in seqs]         # read one position late
    assert not probe.recall_loss(_Oracle(), wrong, 0, "cpu")[2].any()


def test_recall_pretraining_moves_only_the_text_model_and_the_aid_teaches_head_zero(tmp_path):
    aid = {}
    for weight in (1.0, 1e-6):                     # the aid on, and computed but with no pull
        cfg = probe.ProbeConfig(out=str(tmp_path), recall_steps=20, recall_batch=16, recall_attend=weight,
                                attend_layer=2, warmup=1, lr=3e-3, log_every=10, eval_steps=20)
        torch.manual_seed(cfg.seed)
        vlm, tok, _ = probe.build_model(cfg, str(tmp_path / "m"))
        before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
        lines = []
        acc = probe.pretrain_recall(cfg, vlm, tok, {"wall": 0.0, "cpu": 0.0}, lines.append)
        changed = {n for n, p in vlm.named_parameters() if not torch.equal(p, before[n])}
        assert changed and not any("visual" in n for n in changed)
        assert lines[-1].endswith(f"held-out {acc:.3f}") and 0.0 <= acc <= 1.0
        aid[weight] = [float(line.split(" aid ")[1].split()[0]) for line in lines[1:]]
    # head 0 starts spread over the ~30 earlier positions; told where to look it narrows, else it spreads
    # (seed 0, measured over steps 1-10 and 11-20: 3.01, 2.59 with the aid; 3.54, 4.12 without its pull)
    assert aid[1.0][-1] < aid[1.0][0] and aid[1.0][-1] < 0.75 * aid[1e-6][-1]


def test_recall_mix_adds_recall_sequences_to_every_text_step(tmp_path):
    cfg = probe.ProbeConfig(out=str(tmp_path), text_steps=1, text_batch=4, recall_batch=8, warmup=1, log_every=1,
                            find_weight=0, marked_weight=0, letter_weight=1.0)
    weights = {}
    for mix in (False, True):
        torch.manual_seed(cfg.seed)
        vlm, tok, _ = probe.build_model(dataclasses.replace(cfg, recall_mix=mix), str(tmp_path / "m"))
        probe.pretrain_text(dataclasses.replace(cfg, recall_mix=mix), vlm, tok, random.Random(0),
                            {"wall": 0.0, "cpu": 0.0}, lambda *a: None)
        weights[mix] = vlm.model.language_model.embed_tokens.weight.detach().clone()
    # the same seed and the same letter questions (drawn before the recall sequences): the runs differ by
    # the 4 recall sequences' gradient alone
    assert not torch.equal(weights[True], weights[False])
