"""model.py, many prompts at once: batched decoding and batched log-probs equal the one-prompt path.

Prompts differ in question length, frame count and frame size, so left padding, per-row rope
positions and per-row stops are all exercised. A freshly initialized model greedily repeats one
token whatever its input, which would hide a wrong position or a wrong cache row; the tests use a
copy with larger text weights, whose next token depends on position and context.
"""
import os

import pytest
import torch

import data as D
import model as M

# (record index, max frames, pixel budget per frame)
PROMPT_SHAPES = [(0, 4, 84 * 84), (1, 8, 56 * 84), (2, 12, 56 * 56), (6, 5, 84 * 112)]


@pytest.fixture(scope="module")
def prompts(tiny_data, tiny_policy):
    _, tok, vision = tiny_policy
    recs = D.load_records(os.path.join(tiny_data, "train.json"))
    out = []
    for i, max_frames, pixels in PROMPT_SHAPES:
        video = D.load_video_sample(recs[i], D.FrameConfig(2.0, 4, max_frames))
        parts = D.render_prompt(recs[i]["question"], video.times, video.duration)
        out.append(M.tokenize_prompt(tok, parts, video.frames, vision, max_pixels=pixels))
    assert len({len(p) for p in out}) == len(out) and len({len(p.image_grid_thw) for p in out}) > 2
    assert len({p.frame_size for p in out}) > 1
    return out


def sampling(tok, stop, temperature, max_new=16):
    return M.Sampling(max_new, stop, tok.pad_token_id, temperature, 0.95, tuple(M.vision_token_ids(tok)))


def assert_same_results(one, many):
    assert len(one) == len(many)
    for (ids1, mask1, tr1), (ids2, mask2, tr2) in zip(one, many):
        assert torch.equal(ids1, ids2)
        assert torch.equal(mask1, mask2)
        assert torch.equal(tr1, tr2)


def test_batched_greedy_equals_one_prompt_at_a_time(sharp, prompts):
    model, tok, _ = sharp
    free = M.generate_groups(model, prompts, 1, sampling(tok, [], 0.0), batch_prompts=1)
    # Stop on tokens the free runs write at different steps, so prompts stop (and leave the batch) at
    # different times, and one runs to the limit.
    stop = [int(free[0][0][0, 3]), int(free[2][0][0, 9])]
    S = sampling(tok, stop, 0.0)
    one = M.generate_groups(model, prompts, 1, S, batch_prompts=1)
    many = M.generate_groups(model, prompts, 1, S, batch_prompts=len(prompts))
    assert_same_results(one, many)
    lengths = [int(m.sum()) for _, m, _ in one]
    assert len(set(lengths)) > 1 and any(bool(t.any()) for _, _, t in one) and not all(bool(t.any()) for _, _, t in one)
    assert len(set(tuple(ids[0].tolist()) for ids, _, _ in one)) == len(prompts)   # prompts matter


def test_batched_sampling_with_per_prompt_generators_equals_one_at_a_time(sharp, prompts):
    model, tok, _ = sharp
    vocab = sorted(set(range(len(tok))) - set(M.vision_token_ids(tok)))
    S = sampling(tok, vocab[::8], 1.0)               # ~1 token in 8 stops: rows end at different steps

    def gens(seed):
        return [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]

    one = M.generate_groups(model, prompts, 3, S, gens(10), batch_prompts=1)
    many = M.generate_groups(model, prompts, 3, S, gens(10), batch_prompts=3)  # chunks of 3 and 1
    assert_same_results(one, many)
    # A prompt's draws do not depend on its batch mates: alone, it gets the same completions.
    alone = M.generate_batch(model, prompts[2:3], 3, S, gens(10)[2:3])
    assert_same_results(one[2:3], alone)
    lengths = {int(m.sum()) for _, mask, _ in one for m in mask}
    assert len(lengths) > 2                           # stops really happened at different steps
    other = M.generate_batch(model, prompts[2:3], 3, S, gens(99)[2:3])
    assert not torch.equal(other[0][0], one[2][0])    # the generators matter


def groups(tok, prompts):
    """Completions of different sizes per group (G_i rows of C_i tokens), as RL and SD groups have."""
    g = torch.Generator().manual_seed(0)
    normal = torch.tensor(sorted(set(range(len(tok))) - set(M.vision_token_ids(tok))))
    shapes = [(3, 7), (2, 11), (4, 1), (1, 5)]
    comps = [normal[torch.randint(0, len(normal), s, generator=g)] for s in shapes]
    weights = [torch.randn(s, generator=g) for s in shapes]
    return comps, weights


def test_batched_logprobs_and_gradients_equal_per_group(sharp, prompts):
    model, tok, _ = sharp
    comps, weights = groups(tok, prompts)

    def run(logprob_batch):
        model.zero_grad()
        logps = M.groups_logprobs(model, prompts, comps, logprob_batch)
        sum((lp * w).sum() for lp, w in zip(logps, weights)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return [lp.detach() for lp in logps], grads

    one, g_one = run(1)
    many, g_many = run(4)
    model.zero_grad()
    for a, b, c in zip(one, many, comps):
        assert b.shape == c.shape
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert g_one.keys() == g_many.keys() and any("visual" in n for n in g_one)
    for n in g_one:
        # float32 noise relative to the gradient's own scale (the sharp model's gradients reach ~300):
        # measured up to 2e-5, the same as between the per-group path and the plain repeated path.
        scale = g_one[n].abs().max()
        assert (g_many[n] - g_one[n]).abs().max() <= 5e-5 * scale, n


def test_logprob_chunks_and_module_modes_agree(sharp, prompts):
    model, tok, _ = sharp
    comps, _ = groups(tok, prompts)
    with torch.no_grad():
        one = M.groups_logprobs(model, prompts, comps, 1)
        chunked = M.groups_logprobs(model, prompts, comps, 3)            # chunks of 3 and 1 groups
        module = M.LogProbModule(model)(prompts, comps, mode="multi")
        # the plain repeated path, row by row, as a third opinion
        plain = [torch.stack(M.plain_logprobs(model, [p] * len(c), list(c))) for p, c in zip(prompts, comps)]
    for a, b, c, d in zip(one, chunked, module, plain):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d, a, atol=1e-5, rtol=1e-5)


def test_prefill_rows_holds_each_prompts_own_cache_right_aligned(sharp, prompts):
    model, _, _ = sharp
    repeats = [2, 1, 3, 1]
    with torch.no_grad():
        cache, mask, last, starts = M.prefill_rows(model, prompts, repeats)
        L, r = max(len(p) for p in prompts), 0
        assert mask.shape == (sum(repeats), L) and len(last) == len(starts) == sum(repeats)
        for p, n in zip(prompts, repeats):
            own, own_last, own_start = M._prefill(model, p, grad=False)
            for row in range(r, r + n):
                assert mask[row].tolist() == [0] * (L - len(p)) + [1] * len(p)
                assert int(starts[row]) == own_start and torch.equal(last[row], own_last[0])
                for (k, v, _), (k1, v1, _) in zip(cache, own):
                    assert torch.equal(k[row, :, L - len(p):], k1[0]) and torch.equal(v[row, :, L - len(p):], v1[0])
            r += n


def test_slot_cache_decodes_like_the_dynamic_cache_writing_in_place(sharp, prompts):
    """The preallocated cache (SlotCache) against transformers' DynamicCache it replaced in decoding:
    the same prefix rows, the same tokens fed step by step with a prompt dropped midway, the same
    hidden states; its buffers are written in place (never reallocated) and refuse to overflow."""
    model, tok, _ = sharp
    repeats, room = [2, 1, 2, 1], 5
    normal = torch.tensor(sorted(set(range(len(tok))) - set(M.vision_token_ids(tok))))
    feed = normal[torch.randint(0, len(normal), (sum(repeats), room), generator=torch.Generator().manual_seed(1))]
    lm = model.model.language_model
    with torch.no_grad():
        dyn, attn, _, starts = M.prefill_rows(model, prompts, repeats)
        slots, attn2, _, _ = M.prefill_rows(model, prompts, repeats, room=room)
        assert isinstance(slots, M.SlotCache) and torch.equal(attn, attn2)
        buffers = [layer.k_buf.data_ptr() for layer in slots.layers]
        rows = torch.arange(sum(repeats))
        for step in range(room):
            if step == 2:                              # the third prompt's rows leave, as generate_batch drops them
                keep = torch.tensor([0, 1, 2, 5])
                dyn.reorder_cache(keep), slots.reorder_cache(keep)
                rows, attn = rows[keep], attn[keep]
                buffers = [layer.k_buf.data_ptr() for layer in slots.layers]
            attn = torch.cat([attn, attn.new_ones(len(rows), 1)], dim=1)
            outs = [lm(input_ids=feed[rows, step:step + 1], attention_mask=attn, cache=c, use_cache=True,
                       position_ids=M._row_positions(starts[rows], step, 1)).last_hidden_state for c in (dyn, slots)]
            torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
            assert [layer.k_buf.data_ptr() for layer in slots.layers] == buffers
            for (k, v, _), (k2, v2) in zip(dyn, slots):
                assert torch.equal(k2, k) and torch.equal(v2, v)
        with pytest.raises(ValueError, match="KV cache full"):
            lm(input_ids=feed[rows, :1], attention_mask=torch.cat([attn, attn.new_ones(len(rows), 1)], dim=1),
               cache=slots, use_cache=True, position_ids=M._row_positions(starts[rows], room, 1))


def test_batched_greedy_tokens_are_the_full_forward_argmax(sharp, prompts):
    """Decoding on the preallocated cache, checked without any cache: each greedy token is the argmax
    of the model run on the whole prompt + completion so far (vision tokens banned in both)."""
    model, tok, _ = sharp
    out = M.generate_groups(model, prompts, 1, sampling(tok, [], 0.0, max_new=10), batch_prompts=len(prompts))
    banned = torch.tensor(M.vision_token_ids(tok))
    with torch.no_grad():
        hidden = M.plain_hidden(model, prompts, [ids[0] for ids, _, _ in out])
    for (ids, _, _), h in zip(out, hidden):
        logits = model.lm_head(h).index_fill(-1, banned, float("-inf"))  # (C, V)
        assert torch.equal(logits.argmax(-1), ids[0])
