"""The pure advantage math of PPO/GRPO/RLOO (methods.ppo_advantages) on tiny hand-checked tensors."""

import pytest
import torch

from rftengine.methods.ppo_advantages import critic_advantages, critic_free_advantages, kl_shaped_rewards

MASK = torch.tensor([[True, True, False], [True, False, False]])
SCORES = torch.tensor([1.0, 2.0])
TOKEN_KL = torch.tensor([[0.1, 0.2, 0.0], [0.4, 0.0, 0.0]])


def test_kl_shaped_rewards_put_the_score_on_the_last_response_token():
    plain = kl_shaped_rewards(SCORES, MASK)
    assert torch.equal(plain, torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]))
    shaped = kl_shaped_rewards(SCORES, MASK, TOKEN_KL, kl_coef=0.5)  # r_t = -β·KL_t, + score at the end
    torch.testing.assert_close(shaped, torch.tensor([[-0.05, 0.9, 0.0], [1.8, 0.0, 0.0]]))
    empty = kl_shaped_rewards(torch.tensor([3.0]), torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(empty, torch.tensor([[3.0, 0.0, 0.0]]))  # no response token: the first position


def test_critic_advantages_with_gamma_and_lambda_one_are_reward_to_go_minus_value():
    values = torch.tensor([[0.5, 0.25, 9.0], [1.0, 9.0, 9.0]])  # 9.0 sits outside the mask
    adv, returns, old_values = critic_advantages(SCORES, values, MASK, TOKEN_KL, kl_coef=0.5, gamma=1.0, lam=1.0,
                                                 whiten_advantages=False)
    # γ = λ = 1: A_t = Σ_{s>=t} r_s - V_t (the values telescope), returns = A + V
    torch.testing.assert_close(adv, torch.tensor([[0.35, 0.65, 0.0], [0.8, 0.0, 0.0]]))
    torch.testing.assert_close(returns[MASK], torch.tensor([0.85, 0.9, 1.8]))
    assert torch.equal(old_values, torch.tensor([[0.5, 0.25, 0.0], [1.0, 0.0, 0.0]]))


def test_critic_advantages_whiten_over_the_valid_tokens_only():
    values = torch.tensor([[0.5, 0.25, 9.0], [1.0, 9.0, 9.0]])
    adv, _, _ = critic_advantages(SCORES, values, MASK, TOKEN_KL, kl_coef=0.5, gamma=1.0, lam=1.0,
                                  whiten_advantages=True)
    assert abs(float(adv[MASK].mean())) < 1e-6 and torch.all(adv[~MASK] == 0)
    assert adv[0, 0] < adv[0, 1] < adv[1, 0]  # the order of 0.35 < 0.65 < 0.8 is kept


@pytest.mark.parametrize("seq_kl, expected", [(None, [-1.0, 1.0, -1.0, 1.0]),
                                              (torch.tensor([0.0, 2.0, 0.0, 0.0]), [0.0, 0.0, -1.0, 1.0])])
def test_critic_free_advantages_take_the_sequence_kl_out_of_the_score_first(seq_kl, expected):
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # RLOO with groups of 2: each score minus the other one's; β·KL = 0.5·2 turns 2.0 into 1.0
    adv = critic_free_advantages(scores, 2, seq_kl, kl_coef=0.5, mode="rloo", scale="none")
    torch.testing.assert_close(adv, torch.tensor(expected))
