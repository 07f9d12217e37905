"""Double-DQN targets and the Huber loss against hand-computed values; the Q-network."""

from __future__ import annotations

import pytest
import torch

from moekit.rl.dqn import QNetwork, QNetworkConfig, dqn_loss, masked_argmax, q_targets


def test_double_dqn_targets_by_hand():
    q_online = torch.tensor([[1.0, 5.0, 2.0], [0.0, 1.0, 3.0], [4.0, 2.0, 1.0]])
    q_target = torch.tensor([[10.0, 20.0, 30.0], [7.0, 8.0, 9.0], [6.0, 5.0, 4.0]])
    reward = torch.tensor([1.0, -0.5, 0.5])
    done = torch.tensor([False, False, True])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    got = q_targets(q_online, q_target, reward, done, mask, gamma=0.9, double=True)
    # row 0: online argmax = 1 -> target 20 -> 1 + .9 * 20 = 19
    # row 1: item 2 not allowed, online argmax over {0, 1} = 1 -> target 8 -> -.5 + 7.2 = 6.7
    # row 2: terminal -> reward only
    torch.testing.assert_close(got, torch.tensor([19.0, 6.7, 0.5]))
    # vanilla DQN: max of the target network over allowed items: 30 and 8
    vanilla = q_targets(q_online, q_target, reward, done, mask, gamma=0.9, double=False)
    torch.testing.assert_close(vanilla, torch.tensor([1 + 0.9 * 30, -0.5 + 0.9 * 8, 0.5]))
    # nothing left to recommend: no bootstrap
    nothing = torch.zeros(3, 3, dtype=torch.bool)
    empty = q_targets(q_online, q_target, reward, torch.tensor([False] * 3), nothing, 0.9)
    torch.testing.assert_close(empty, reward)


def test_huber_loss_by_hand():
    q = torch.tensor([[0.0, 2.0], [1.0, -1.0]], requires_grad=True)
    loss = dqn_loss(q, torch.tensor([1, 0]), torch.tensor([2.5, 4.0]), huber_delta=1.0)
    # errors 0.5 (quadratic: .5 * .25) and 3 (linear: 3 - .5)
    assert loss.item() == pytest.approx((0.125 + 2.5) / 2)
    loss.backward()
    torch.testing.assert_close(q.grad, torch.tensor([[0.0, -0.25], [-0.5, 0.0]]))


@pytest.mark.parametrize("q_net", ["mlp", "moe"])
def test_q_network_scores_the_catalogue_and_handles_empty_states(q_net):
    torch.manual_seed(0)
    net = QNetwork(QNetworkConfig(num_items=7, dim=8, ffn_hidden=8, q_net=q_net))
    states = torch.tensor([[7, 7, 1, 2], [7, 7, 7, 7], [2, 1, 7, 7]])  # 7 = padding
    q, aux = net(states)
    assert q.shape == (3, 7) and torch.isfinite(q).all()
    torch.testing.assert_close(q[0], q[2])  # the state is a set: order and padding position do not matter
    assert (aux.item() > 0) == (q_net == "moe")
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, q.argmax(1)[0]] = False
    assert (masked_argmax(q, mask) != q.argmax(1)[0]).all()
    with pytest.raises(ValueError, match="unknown q_net"):
        QNetworkConfig(num_items=3, q_net="rnn")


def test_items_warm_started_from_mf_give_mf_bias_q_values_for_an_empty_state():
    torch.manual_seed(0)
    net = QNetwork(QNetworkConfig(num_items=5, dim=6, ffn_hidden=8))
    factors, bias = torch.randn(5, 3), torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    net.init_items_from_mf(factors, bias, reward_scale=0.5)
    torch.testing.assert_close(net.item_out.weight[:, :3], factors)
    torch.testing.assert_close(net.item_in.weight[:5, :3], factors)
    assert net.item_in.weight[5].abs().sum() == 0  # padding row untouched
    # an empty state encodes to empty_state + FFN(LayerNorm(empty_state)); removing that leaves the bias
    q, _ = net(torch.full((1, 2), 5))
    h = net.empty_state + net.block(net.norm(net.empty_state))
    torch.testing.assert_close(q[0] - h @ net.item_out.weight.T, bias * 0.5)
    with pytest.raises(ValueError, match="do not fit 5 items of dim 6"):
        net.init_items_from_mf(torch.randn(5, 7), bias)
