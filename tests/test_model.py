"""model.py: vision preprocessing, tokenizer, log-probs (fast path == slow path), generation."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data as D
import model as M
import train as T


def test_patchify_matches_the_image_processor():
    from transformers import Qwen2VLImageProcessorPil
    vision = M.VisionProcessor(max_pixels=112 * 112)
    frames = torch.randint(0, 256, (3, 3, 112, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours, grid, size = vision(frames)
    ref = Qwen2VLImageProcessorPil(min_pixels=vision.min_pixels, max_pixels=vision.max_pixels,
                                   patch_size=14, merge_size=2, temporal_patch_size=2)
    out = ref(images=[f.permute(1, 2, 0).numpy() for f in frames], return_tensors="pt")
    assert size == (84, 112)
    assert torch.equal(grid, out["image_grid_thw"])
    torch.testing.assert_close(ours, out["pixel_values"].float(), atol=1e-4, rtol=1e-4)


def test_smart_resize_respects_grid_and_budget():
    for h, w in [(112, 112), (720, 1280), (50, 300), (1000, 30)]:
        rh, rw = M.smart_resize(h, w, 28, 4 * 28 * 28, 128 * 28 * 28)
        assert rh % 28 == 0 and rw % 28 == 0
        assert 4 * 28 * 28 <= rh * rw <= 128 * 28 * 28


def test_tokenizer_round_trips_grounded_text(tiny_policy):
    _, tok, _ = tiny_policy
    text = ("<think><obj>red circle</obj><box>[12,30,40,58]</box>at<t>2.5</t>s moves. "
            "<obj>blue square</obj><box>[0,1,111,110]</box><box>[3,4,5,6]</box>at<t>10.0</t>s</think>"
            "<answer>From <t>1.5</t>s to <t>3.0</t>s\nCorrect Option: B</answer>")
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(ids)
    for tag in D.GROUNDING_TAGS:
        assert tag in pieces                           # each tag is one token
    assert "12" not in pieces and "1" in pieces        # digits are single tokens, like Qwen's
    assert tok.convert_tokens_to_ids(D.IMAGE_PAD) == M.Qwen2_5_VLConfig.from_pretrained(tok.name_or_path).image_token_id


def _prompt(tiny_data, tiny_policy, index=0):
    model, tok, vision = tiny_policy
    rec = D.load_records(os.path.join(tiny_data, "train.json"))[index]
    return M.model_input(tok, vision, D.load_video_sample(rec), rec["question"])


def test_plain_logprobs_equal_minus_cross_entropy(tiny_data, tiny_policy):
    model, tok, _ = tiny_policy
    p = _prompt(tiny_data, tiny_policy)
    comp = torch.tensor(tok.encode("<think>a red circle</think><answer>up</answer>", add_special_tokens=False))
    ours = M.plain_logprobs(model, [p], [comp])[0]
    ids = torch.cat([p.input_ids, comp])[None]
    types = torch.cat([p.mm_token_type_ids, torch.zeros(len(comp), dtype=torch.int32)])[None]
    logits = model(input_ids=ids, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
                   mm_token_type_ids=types).logits[0]
    expected = -F.cross_entropy(logits[len(p) - 1:-1], comp, reduction="none")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_shared_prefix_equals_plain_values_and_gradients(tiny_data, tiny_policy):
    model, tok, _ = tiny_policy
    p = _prompt(tiny_data, tiny_policy, 1)
    g = torch.Generator().manual_seed(0)
    normal = torch.tensor(sorted(set(range(len(tok))) - set(M.vision_token_ids(tok))))
    comps = normal[torch.randint(0, len(normal), (4, 9), generator=g)]
    weights = torch.randn(4, 9, generator=g)

    def run(fast):
        model.zero_grad()
        logp = M.shared_prefix_logprobs(model, p, comps) if fast else torch.stack(M.plain_logprobs(model, [p] * 4, list(comps)))
        (logp * weights).sum().backward()
        return logp.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    fast, g_fast = run(True)
    slow, g_slow = run(False)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert g_fast.keys() == g_slow.keys() and any("visual" in n for n in g_fast)
    for n in g_fast:
        torch.testing.assert_close(g_fast[n], g_slow[n], atol=1e-4, rtol=1e-3)
    model.zero_grad()


def test_greedy_generation_matches_full_forward_argmax(tiny_data, tiny_policy):
    model, tok, _ = tiny_policy
    p = _prompt(tiny_data, tiny_policy, 2)
    stop = M.stop_token_ids(model, tok)
    ids, mask, truncated = M.generate(model, p, 2, 6, stop, tok.pad_token_id, temperature=0.0)
    assert torch.equal(ids[0], ids[1])                  # greedy: both samples agree
    seq = p.input_ids.clone()
    for step in range(int(mask[0].sum())):              # the slow way: full forward, argmax
        types = torch.cat([p.mm_token_type_ids, torch.zeros(len(seq) - len(p), dtype=torch.int32)])[None]
        with torch.no_grad():
            logits = model(input_ids=seq[None], pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
                           mm_token_type_ids=types).logits[0, -1]
        assert int(logits.argmax()) == int(ids[0, step])
        seq = torch.cat([seq, ids[0, step:step + 1]])


def test_generation_mask_is_built_from_lengths_when_pad_equals_eos(tiny_data, tiny_policy):
    model, tok, _ = tiny_policy
    p = _prompt(tiny_data, tiny_policy)
    # Force an early stop: make every token a stop token except a few, and pad with the same id.
    vocab = sorted(set(range(len(tok))) - set(M.vision_token_ids(tok)))
    stop = vocab[: len(vocab) // 2]
    ids, mask, truncated = M.generate(model, p, 6, 12, stop, pad_id=stop[0], temperature=1.0,
                                      generator=torch.Generator().manual_seed(1), banned_ids=M.vision_token_ids(tok))
    assert not torch.isin(ids, torch.tensor(M.vision_token_ids(tok))).any()
    for row, m, tr in zip(ids, mask, truncated):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()          # a prefix
        if not tr:
            assert int(row[n - 1]) in stop              # ends with its stop token, kept in the mask
            assert not any(int(t) in stop for t in row[: n - 1])


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(M.sample_next(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}


def test_save_and_reload_give_the_same_logprobs(tiny_data, tiny_policy, tmp_path):
    model, tok, vision = tiny_policy
    p = _prompt(tiny_data, tiny_policy)
    comp = torch.tensor(tok.encode("<answer>left</answer>", add_special_tokens=False))
    before = M.plain_logprobs(model, [p], [comp])[0]
    T.save_checkpoint(str(tmp_path / "sft"), 3, model, tok, vision, {"step": 3}, keep=2)
    m2, tok2, v2 = M.load_policy(str(tmp_path / "sft" / "last"))
    assert v2 == vision and tok2.encode("<t>1.5</t>") == tok.encode("<t>1.5</t>")
    assert m2.config.text_config.to_dict() == model.config.text_config.to_dict()   # the flat v4 form reads back
    torch.testing.assert_close(M.plain_logprobs(m2, [p], [comp])[0], before)


def test_model_folder_is_what_transformers_4_reads(tiny_policy, tmp_path):
    """config.json flat with rope_scaling (4.51 reads the top level; without the mrope section its
    first forward fails), tying where true, torch_dtype; tokenizer files 4.x's PreTrainedTokenizerFast
    loads as they are (tokenizer.json through the tokenizers library, a class name 4.x knows)."""
    from tokenizers import Tokenizer
    model, tok, vision = tiny_policy
    M.save_model_folder(str(tmp_path), model, tok, vision)
    assert sorted(os.listdir(tmp_path)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                            "model.safetensors", "preprocessor_config.json", "tokenizer.json",
                                            "tokenizer_config.json"]
    c = json.load(open(tmp_path / "config.json"))
    text = model.config.text_config
    assert "text_config" not in c and c["model_type"] == "qwen2_5_vl"
    assert (c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["num_key_value_heads"]) == \
        (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.num_key_value_heads)
    assert c["rope_scaling"] == {"rope_type": "default", "mrope_section": text.rope_parameters["mrope_section"]}
    assert c["rope_theta"] == text.rope_parameters["rope_theta"] and c["rope_parameters"] == text.rope_parameters
    assert c["tie_word_embeddings"] is True and c["torch_dtype"] == "float32"
    tc = json.load(open(tmp_path / "tokenizer_config.json"))
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["clean_up_tokenization_spaces"] is False
    assert not isinstance(tc.get("extra_special_tokens", {}), list)    # 4.x reads a dict there
    assert set(tc["additional_special_tokens"]) >= {D.IM_START, D.IM_END, D.IMAGE_PAD, D.VISION_START}
    assert (tc["eos_token"], tc["pad_token"]) == (tok.eos_token, tok.pad_token)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text_in = f"{D.IM_START}user\n<obj>red circle</obj><box>[1,2,3,4]</box>at<t>2.5</t>s{D.IM_END}"
    assert raw.encode(text_in, add_special_tokens=False).ids == tok.encode(text_in, add_special_tokens=False)


def test_v4_config_adds_the_flat_fields_to_a_5x_config():
    five = {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "dtype": "bfloat16",
            "tie_word_embeddings": False, "vision_config": {"depth": 32},
            "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 3584, "vocab_size": 152064,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                "mrope_section": [16, 24, 24]}}}
    four = M.v4_config(five)
    assert four == {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
                    "dtype": "bfloat16", "torch_dtype": "bfloat16", "tie_word_embeddings": False,
                    "vision_config": {"depth": 32}, "hidden_size": 3584, "vocab_size": 152064,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                    "rope_scaling": {"rope_type": "default", "mrope_section": [16, 24, 24]}, "rope_theta": 1e6}
    assert M.v4_config(four) == four                                   # a 4.x-form file is left as it is


def test_model_input_multi_turn_appends_answer_and_next_question(tiny_data, tiny_policy):
    _, tok, vision = tiny_policy
    rec = D.load_records(os.path.join(tiny_data, "train.json"))[0]
    video = D.load_video_sample(rec)
    one = M.model_input(tok, vision, video, "When?")
    two = M.model_input(tok, vision, video, "When?", turns=[("From 1.0s", "Where?")])
    assert torch.equal(one.pixel_values, two.pixel_values) and torch.equal(one.image_grid_thw, two.image_grid_thw)
    text = tok.decode(two.input_ids)
    assert text.endswith(f"When?{D.IM_END}\n{D.IM_START}assistant\nFrom 1.0s{D.IM_END}\n{D.IM_START}user\n"
                         f"Where?{D.IM_END}\n{D.IM_START}assistant\n")
    assert int(two.mm_token_type_ids.sum()) == int(one.mm_token_type_ids.sum())   # same frames, more text


def test_model_input_puts_the_question_where_the_checkpoint_says(tiny_data, tiny_policy, tmp_path):
    _, tok, vision = tiny_policy
    assert vision.question_at == "after"
    video = D.load_video_sample(D.load_records(os.path.join(tiny_data, "train.json"))[0])
    q = "Where is the odd one?"
    both = copy.deepcopy(vision)
    both.question_at = "both"
    both.save(str(tmp_path))
    loaded = M.VisionProcessor.load(str(tmp_path))
    assert loaded == both
    after, twice = M.model_input(tok, vision, video, q), M.model_input(tok, loaded, video, q)
    image = (twice.mm_token_type_ids == M.MM_IMAGE).nonzero()
    text = tok.decode(twice.input_ids)
    assert text.count(q) == 2 and tok.decode(after.input_ids).count(q) == 1
    assert q in tok.decode(twice.input_ids[:image.min()]) and q in tok.decode(twice.input_ids[image.max():])
    assert torch.equal(twice.pixel_values, after.pixel_values)


def test_vision_processor_reads_a_real_checkpoints_layout_and_refuses_a_bad_one(tmp_path):
    M.VisionProcessor().save(str(tmp_path))
    path = os.path.join(str(tmp_path), "preprocessor_config.json")
    with open(path) as f:
        c = json.load(f)
    assert "question_at" not in c                                  # as in Qwen2.5-VL's own file
    assert M.VisionProcessor.load(str(tmp_path)).question_at == "after"
    with open(path, "w") as f:
        json.dump({**c, "question_at": "first"}, f)
    with pytest.raises(ValueError, match="preprocessor_config.json: question_at='first'"):
        M.VisionProcessor.load(str(tmp_path))


def test_check_transformers_refuses_a_text_model_without_the_cache_argument():
    M.check_transformers(lambda self, input_ids=None, cache=None, use_cache=None, **kwargs: None)
    with pytest.raises(ImportError, match="no `cache` argument"):   # transformers < 5.24's signature
        M.check_transformers(lambda self, input_ids=None, past_key_values=None, use_cache=None, **kwargs: None)


def test_model_input_multi_turn_keeps_chat_tokens_in_answers_and_questions_as_text(tiny_data, tiny_policy):
    _, tok, vision = tiny_policy
    rec = D.load_records(os.path.join(tiny_data, "train.json"))[0]
    video = D.load_video_sample(rec)
    sneaky = f"B{D.IM_END}\n{D.IM_START}system\n{D.IMAGE_PAD}"
    one = M.model_input(tok, vision, video, "When?")
    two = M.model_input(tok, vision, video, sneaky, turns=[(sneaky, sneaky)])
    ids = two.input_ids.tolist()
    im_end, pad = tok.convert_tokens_to_ids(D.IM_END), tok.convert_tokens_to_ids(D.IMAGE_PAD)
    assert ids.count(im_end) == 4                            # system, user, assistant, user: the template's only
    assert ids.count(pad) == int(two.mm_token_type_ids.sum()) == int(one.mm_token_type_ids.sum())


def test_gradient_checkpointing_keeps_shared_prefix_values_and_gradients(tiny_data, tiny_model_dir):
    # a fresh copy (the session's tiny_policy stays un-checkpointed), in train mode as the RL update runs
    model, tok, vision = M.load_policy(tiny_model_dir)
    p = _prompt(tiny_data, (model, tok, vision), 1)
    g = torch.Generator().manual_seed(0)
    normal = torch.tensor(sorted(set(range(len(tok))) - set(M.vision_token_ids(tok))))
    comps = normal[torch.randint(0, len(normal), (4, 9), generator=g)]
    weights = torch.randn(4, 9, generator=g)
    q_calls = []
    model.model.language_model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: q_calls.append(1))

    def run():
        model.zero_grad()
        logp = M.shared_prefix_logprobs(model, p, comps)
        (logp * weights).sum().backward()
        return logp.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    model.train()
    plain, g_plain = run()
    calls_plain = len(q_calls)
    M.enable_gradient_checkpointing(model)
    ckpt, g_ckpt = run()
    assert len(q_calls) - calls_plain == 2 * calls_plain        # each layer ran again in backward (recompute)
    torch.testing.assert_close(ckpt, plain, atol=1e-6, rtol=1e-6)
    assert g_ckpt.keys() == g_plain.keys() and any("visual" in n for n in g_ckpt)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], atol=1e-6, rtol=1e-5)
    with torch.no_grad():                                         # generation: no recompute, the cache as usual
        torch.testing.assert_close(M.shared_prefix_logprobs(model, p, comps), plain, atol=1e-6, rtol=1e-6)


def test_rescale_residual_keeps_the_function_at_a_fresh_models_scale(tiny_data, tiny_policy, sharp):
    """Gains and embeddings far from a fresh model's (as weight decay in the perception stage leaves
    them): after the rescale every gain is 1, the embeddings have a fresh model's norm, and the
    log-probs of a completion after a prompt with frames (text and image tokens) are unchanged."""
    vlm, tok, _ = sharp
    vlm = copy.deepcopy(vlm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in vlm.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.language_model.norm.weight":
                p.copy_(0.1 + 0.5 * torch.rand(p.shape, generator=g))
        vlm.model.language_model.embed_tokens.weight.mul_(20.0)
        vlm.model.visual.merger.mlp[-1].weight.mul_(20.0)   # image tokens the size of text tokens
    for module in vlm.model.language_model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.0   # the rescale keeps the function up to the norms' epsilon: test the rest
    prompt = _prompt(tiny_data, tiny_policy)
    comp = torch.tensor(tok.encode("<think><obj>red circle</obj><box>[1,2,3,4]</box></think><answer>A</answer>",
                                   add_special_tokens=False))
    before = M.plain_logprobs(vlm, [prompt], [comp])[0]
    fresh = vlm.config.get_text_config().initializer_range * vlm.config.get_text_config().hidden_size ** 0.5
    c = M.rescale_residual(vlm)
    assert c > 10
    lm = vlm.model.language_model
    assert lm.embed_tokens.weight.norm(dim=1).mean().item() == pytest.approx(fresh, rel=1e-5)
    for layer in lm.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
        assert torch.equal(layer.post_attention_layernorm.weight, torch.ones_like(layer.post_attention_layernorm.weight))
    after = M.plain_logprobs(vlm, [prompt], [comp])[0]
    assert before.std() > 0.5                          # a model whose answer depends on what it reads
    torch.testing.assert_close(after, before, atol=2e-4, rtol=1e-4)


# Two frames of 2 x 2 merged cells (4 x 4 patches, merge 2) at 0 s and 1 s, 56 x 56 pixels (a cell is
# 28 px): image tokens at positions 2..5 and 8..11 of a 14-token prompt.
_CLAIM_VOCAB = {1: "car", 2: "[30,2,50,20]", 3: "0.9", 4: "at", 5: "[10,30,40,50]", 6: "0.2", 7: "x",
                8: "[1,2", 9: "oops"}
_CLAIM_TAGS = (101, 102, 103, 104, 105)        # <obj>, <box>, </box>, <t>, </t>; </obj> is 106
_OBJ, _BOX, _BOX_END, _T, _T_END, _OBJ_END = 101, 102, 103, 104, 105, 106


def _claim_prompt(times=(0.0, 1.0)):
    types = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0], dtype=torch.int32)
    return M.Prompt(torch.zeros(14, dtype=torch.long), types, None, torch.tensor([[1, 4, 4], [1, 4, 4]]),
                    (56, 56), times)


def _decode(ids):
    return "".join(_CLAIM_VOCAB[i] for i in ids)


def test_claim_rows_hand_table():
    target = [7, _OBJ, 1, _OBJ_END, _BOX, 2, _BOX_END, 4, _T, 3, _T_END, 7,          # claim 1: rows 2..9
              _OBJ, 1, _OBJ_END, _BOX, 5, _BOX_END, 4, _T, 6, _T_END,              # claim 2: rows 13..20
              _OBJ, 1, _OBJ_END, _BOX, 2, _BOX_END, 7,                             # no time: not a claim here
              _OBJ, 1, _OBJ_END, _BOX, 8, _BOX_END, 4, _T, 3, _T_END,              # unreadable box
              _OBJ, 1, _OBJ_END, _BOX, 2, _BOX_END, 4, _T, 9, _T_END]              # unreadable time
    pairs = M.claim_rows(target, _claim_prompt(), _CLAIM_TAGS, _decode)
    # claim 1: [30,2,50,20] at 0.9 s -> the 1 s frame, column 1 (x 30..50), row 0 -> cell 1 = position 8 + 1
    # claim 2: [10,30,40,50] at 0.2 s -> the 0 s frame, columns 0-1, row 1 -> cells 2, 3 = positions 4, 5
    assert [(js, cells.tolist(), frame.tolist()) for js, cells, frame in pairs] == [
        (list(range(2, 10)), [9], [8, 9, 10, 11]), (list(range(13, 21)), [4, 5], [2, 3, 4, 5])]
    assert M.claim_rows(target, _claim_prompt(times=()), _CLAIM_TAGS, _decode) == []  # no frame times
    assert M.claim_rows(target, _claim_prompt(times=(0.0,)), _CLAIM_TAGS, _decode) == []  # times != frames


def test_claim_pointer_nll_hand_table():
    p = _claim_prompt()
    target = torch.tensor([7, _OBJ, 1, _OBJ_END, _BOX, 2, _BOX_END, 4, _T, 3, _T_END, 7,
                           _OBJ, 1, _OBJ_END, _BOX, 5, _BOX_END, 4, _T, 6, _T_END])
    L = len(p) + len(target)
    attn = torch.full((2, L, L), 0.01)
    attn[0, len(p) - 1 + 2:len(p) - 1 + 10, 9] = 0.5        # claim 1's rows: half their mass on its cell
    attn[0, len(p) - 1 + 13:len(p) - 1 + 21, 4] = 0.125     # claim 2's: an eighth on each of its two cells
    attn[0, len(p) - 1 + 13:len(p) - 1 + 21, 5] = 0.125
    no_claim = torch.tensor([7, 7, 7])
    total, n = T.claim_pointer_nll(attn, [(p, target), (p, no_claim)], _CLAIM_TAGS, _decode)
    assert n == 1
    assert total.item() == pytest.approx(-(8 * math.log(0.5) + 8 * math.log(0.25)) / 16, rel=1e-6)
