"""grpo.py: hand-computed losses, shared prefix == plain, RL steps on the tiny model."""
import math

import pytest
import torch

import data
import grpo
import model


def test_group_advantages_normalize_and_zero_std_gives_zero():
    adv = grpo.group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (0.5 + 1e-4))  # population std 0.5
    assert torch.equal(adv[1], torch.zeros(4))


def test_group_advantages_unscaled_keep_a_small_spread_small():
    # one group differs by a hair (a temporal reward), one by a right answer: the std blows the hair up
    rewards = torch.tensor([[2.0, 2.0, 2.0, 2.1], [1.0, 2.0, 1.0, 2.0]])
    scaled = grpo.group_advantages(rewards)
    unscaled = grpo.group_advantages(rewards, scale=False)
    torch.testing.assert_close(unscaled, torch.tensor([[-0.025, -0.025, -0.025, 0.075], [-0.5, 0.5, -0.5, 0.5]]))
    assert scaled[0, 3] > 1.7 and scaled[1, 1] < 1.0                 # scaled: the hair outweighs the answer
    assert torch.equal(grpo.group_advantages(torch.full((3,), 1.5), scale=False), torch.zeros(3))


def test_k3_is_nonnegative_and_zero_when_equal():
    p = torch.log_softmax(torch.randn(50), 0)
    q = torch.log_softmax(torch.randn(50), 0)
    assert (grpo.k3_kl(p, q) >= 0).all()
    assert torch.equal(grpo.k3_kl(p, p), torch.zeros(50))
    assert math.isclose(grpo.k3_kl(torch.tensor(0.0), torch.tensor(math.log(2))).item(), 2 - math.log(2) - 1, rel_tol=1e-6)


def _pg(logp, adv, mask):
    """Textbook policy gradient loss for ratio 1: -mean_g(A_g * mean_t logp)."""
    return -(adv * (logp * mask).sum(-1) / mask.sum(-1)).mean()


@pytest.mark.parametrize("ratio", ["sequence", "token"])
def test_ratio_one_and_beta_zero_is_the_policy_gradient(ratio):
    logp = torch.randn(4, 6, requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] * 6], dtype=torch.float32)
    loss, m = grpo.policy_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.0, ratio)
    (grad,) = torch.autograd.grad(loss, logp)
    (expected,) = torch.autograd.grad(_pg(logp, adv, mask), logp)
    torch.testing.assert_close(grad, expected)
    assert m["clip_frac"] == 0.0 and abs(loss.item() + (adv.mean().item())) < 1e-6


def test_clipping_stops_the_gradient_outside_the_trust_region():
    logp = torch.zeros(2, 3, requires_grad=True)
    old = torch.full((2, 3), -0.5)                 # ratio e^0.5 = 1.65 > 1.2 on every token
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3)
    loss, m = grpo.policy_loss(logp, old, None, adv, mask, clip_eps=0.2, beta=0.0, ratio="sequence")
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.equal(grad[0], torch.zeros(3))    # A > 0 and ratio above 1 + eps: clipped, no gradient
    assert (grad[1] != 0).all()                     # A < 0: min picks the unclipped term, gradient flows
    assert m["clip_frac"] == 1.0


def test_sequence_and_token_ratios_agree_when_token_ratios_are_equal():
    old = torch.randn(3, 5)
    logp = (old + 0.1).requires_grad_()             # every token ratio is e^0.1
    adv = torch.tensor([0.3, -1.2, 0.9])
    mask = torch.ones(3, 5)
    ls, _ = grpo.policy_loss(logp, old, None, adv, mask, 0.2, 0.0, "sequence")
    lt, _ = grpo.policy_loss(logp, old, None, adv, mask, 0.2, 0.0, "token")
    torch.testing.assert_close(ls, lt)
    torch.testing.assert_close(torch.autograd.grad(ls, logp)[0], torch.autograd.grad(lt, logp)[0])


def test_kl_term_adds_beta_times_masked_k3():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, m = grpo.policy_loss(logp, logp, ref, torch.zeros(1), mask, 0.2, 0.5, "sequence")
    k3 = (0.5 - math.log(0.5) - 1 + 0.0) / 2        # token 1: q/p = 0.5; token 2: equal; token 3 masked
    assert math.isclose(loss.item(), 0.5 * k3, rel_tol=1e-5) and math.isclose(m["kl"], k3, rel_tol=1e-5)


def test_group_loss_shared_prefix_equals_plain(tiny_data, tiny_policy):
    vlm, tok, vision = tiny_policy
    rec = data.load_records(f"{tiny_data}/train.json")[0]
    inputs = model.model_input(tok, vision, data.load_video_sample(rec), rec["question"])
    ids, mask, _ = model.generate(vlm, inputs, 4, 10, model.stop_token_ids(vlm, tok), tok.pad_token_id,
                                  generator=torch.Generator().manual_seed(0), banned_ids=model.vision_token_ids(tok))
    group = grpo.Group(rec, inputs, ids, mask, None, [], {"total": [1.0, 0.0, 0.5, 0.2]})
    group.advantages = grpo.group_advantages(torch.tensor(group.rewards["total"]))
    ref = model.LogProbModule(vlm)
    with torch.no_grad():
        group.ref_logp = grpo.group_logprobs(ref, group, True) - 0.05   # a reference that differs
        group.old_logp = grpo.group_logprobs(ref, group, True) + 0.01   # kept pi_old (inner updates > 1)
    policy = model.LogProbModule(vlm)
    out = {}
    for shared in (True, False):
        vlm.zero_grad()
        loss, _ = grpo.group_loss(policy, group, 0.2, 0.04, "sequence", shared)
        loss.backward()
        out[shared] = (loss.item(), {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None})
    assert abs(out[True][0] - out[False][0]) < 1e-6
    for n, g in out[True][1].items():
        torch.testing.assert_close(g, out[False][1][n], atol=1e-5, rtol=1e-3)
    vlm.zero_grad()


def test_group_metrics_by_hand():
    def group(totals, lengths, truncated):
        mask = torch.tensor([[1] * n + [0] * (4 - n) for n in lengths], dtype=torch.bool)
        return grpo.Group({}, None, None, mask, torch.tensor(truncated), [], {"total": totals, "answer": [1.0] * 2},
                          advantages=grpo.group_advantages(torch.tensor(totals)))
    row = grpo.group_metrics([group([1.0, 3.0], [4, 2], [True, False]), None, group([2.0, 2.0], [1, 1], [False, False])])
    assert row["reward/total"] == 2.0 and row["reward/answer"] == 1.0
    assert row["zero_var_share"] == 0.5                          # the second group's rewards are equal
    assert row["completion_len"] == 2.0                          # (4 + 2 + 1 + 1) tokens / 4 completions
    assert row["truncated_share"] == 0.25                        # mean over groups of each group's share
    torch.testing.assert_close(torch.tensor(row["adv_std"]), torch.tensor([1.0, -1.0, 0.0, 0.0]).std(unbiased=False),
                               atol=1e-3, rtol=0)
