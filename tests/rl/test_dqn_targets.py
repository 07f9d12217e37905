"""n-step Double-DQN targets and the Huber loss against hand-computed values; the Q-network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.rl.dqn import QNetwork, QNetworkConfig, dqn_loss, masked_argmax, q_targets


def test_double_dqn_targets_by_hand():
    q_online = torch.tensor([[1.0, 5.0, 2.0], [0.0, 1.0, 3.0], [4.0, 2.0, 1.0]])
    q_target = torch.tensor([[10.0, 20.0, 30.0], [7.0, 8.0, 9.0], [6.0, 5.0, 4.0]])
    ret = torch.tensor([1.0, -0.5, 0.5])
    discount = torch.tensor([0.9, 0.9, 0.0])  # one-step: gamma, 0 at a terminal
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    got = q_targets(q_online, q_target, ret, discount, mask, double=True)
    # row 0: online argmax = 1 -> target 20 -> 1 + .9 * 20 = 19
    # row 1: item 2 not allowed, online argmax over {0, 1} = 1 -> target 8 -> -.5 + 7.2 = 6.7
    # row 2: terminal -> return only
    torch.testing.assert_close(got, torch.tensor([19.0, 6.7, 0.5]))
    # vanilla DQN: max of the target network over allowed items: 30 and 8
    vanilla = q_targets(q_online, q_target, ret, discount, mask, double=False)
    torch.testing.assert_close(vanilla, torch.tensor([1 + 0.9 * 30, -0.5 + 0.9 * 8, 0.5]))
    # nothing left to recommend: no bootstrap
    nothing = torch.zeros(3, 3, dtype=torch.bool)
    torch.testing.assert_close(q_targets(q_online, q_target, ret, discount, nothing), ret)


def test_n_step_target_by_hand():
    # rewards 1, 0.5, -1 then bootstrap after 3 steps with gamma 0.9: R = 1 + .45 - .81 = 0.64,
    # discount .9^3 = .729; Double DQN picks item 0 (online 2 > 1), target Q 10 -> 0.64 + 7.29 = 7.93
    gamma = 0.9
    ret = torch.tensor([1 + gamma * 0.5 + gamma ** 2 * -1.0])
    y = q_targets(torch.tensor([[2.0, 1.0]]), torch.tensor([[10.0, 50.0]]), ret, torch.tensor([gamma ** 3]),
                  torch.tensor([[True, True]]))
    assert y.item() == pytest.approx(7.93)


def test_huber_loss_by_hand():
    q = torch.tensor([[0.0, 2.0], [1.0, -1.0]], requires_grad=True)
    loss = dqn_loss(q, torch.tensor([1, 0]), torch.tensor([2.5, 4.0]), huber_delta=1.0)
    # errors 0.5 (quadratic: .5 * .25) and 3 (linear: 3 - .5)
    assert loss.item() == pytest.approx((0.125 + 2.5) / 2)
    loss.backward()
    torch.testing.assert_close(q.grad, torch.tensor([[0.0, -0.25], [-0.5, 0.0]]))


def _obs(history, items, stars, step):
    return {"history": torch.tensor(history), "user": torch.zeros(len(history), 2, dtype=torch.long),
            "items": torch.tensor(items), "stars": torch.tensor(stars, dtype=torch.float32),
            "step": torch.tensor(step, dtype=torch.float32)}


def _net(q_net: str = "mlp") -> QNetwork:
    torch.manual_seed(0)
    net = QNetwork(QNetworkConfig(num_items=7, num_genres=3, user_feature_sizes=[2, 3], session_window=2,
                                  dim=8, ffn_hidden=8, q_net=q_net))
    net.set_item_genres(np.eye(7, 3) + np.eye(7, 3, k=-3))
    return net


@pytest.mark.parametrize("q_net", ["mlp", "moe"])
def test_q_network_scores_the_catalogue_and_reads_the_session(q_net):
    net = _net(q_net)
    obs = _obs([[7, 7, 1, 2], [7, 7, 7, 7], [2, 1, 7, 7]], [[7, 7]] * 3, [[0, 0]] * 3, [[0.0]] * 3)
    q, aux = net(obs)
    assert q.shape == (3, 7) and torch.isfinite(q).all()
    torch.testing.assert_close(q[0], q[2])  # the history is a set: order and padding position do not matter
    assert (aux.item() > 0) == (q_net == "moe")
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, q.argmax(1)[0]] = False
    assert (masked_argmax(q, mask) != q.argmax(1)[0]).all()
    # the session window changes the values: a disliked Drama-like item vs none
    seen = _obs([[7, 7, 1, 2]] * 2, [[7, 7], [7, 0]], [[0, 0], [0, 1.0]], [[0.0], [1.0]])
    q2, _ = net(seen)
    assert not torch.allclose(q2[0], q2[1])
    # genres are unit rows; item 6 has none, and the padding row is zero
    torch.testing.assert_close(net.item_genres.norm(dim=1), torch.tensor([1.0] * 6 + [0.0, 0.0]))


def test_q_network_round_trips_through_save_pretrained(tmp_path):
    net = _net("moe").eval()
    net.save_pretrained(tmp_path / "q")
    loaded = QNetwork.from_pretrained(tmp_path / "q")
    obs = _obs([[1, 2, 7, 7]], [[3, 4]], [[2.0, 5.0]], [[2.0]])
    torch.testing.assert_close(loaded(obs)[0], net(obs)[0], rtol=0, atol=0)
    assert loaded.config == net.config


def test_items_warm_started_from_mf_give_mf_bias_q_values_for_an_empty_state():
    torch.manual_seed(0)
    net = QNetwork(QNetworkConfig(num_items=5, dim=6, ffn_hidden=8, dueling=False))
    factors, bias = torch.randn(5, 3), torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    net.init_items_from_mf(factors, bias, reward_scale=0.5)
    torch.testing.assert_close(net.item_out.weight[:, :3], factors)
    torch.testing.assert_close(net.item_in.weight[:5, :3], factors)
    assert net.item_in.weight[5].abs().sum() == 0  # padding row untouched
    obs = {"history": torch.full((1, 2), 5), "user": torch.zeros(1, 1, dtype=torch.long),
           "items": torch.full((1, 10), 5), "stars": torch.zeros(1, 10), "step": torch.zeros(1, 1)}
    q, _ = net(obs)
    h, _ = net.encode(obs)
    torch.testing.assert_close(q[0] - h[0] @ net.item_out.weight.T, bias * 0.5)  # no genres: item part is e_a
    with pytest.raises(ValueError, match="do not fit 5 items of dim 6"):
        net.init_items_from_mf(torch.randn(5, 7), bias)


def test_dueling_head_splits_state_value_and_item_advantages():
    net = _net()
    obs = _obs([[1, 2, 7, 7], [7, 7, 7, 7]], [[3, 4], [7, 7]], [[2.0, 5.0], [0, 0]], [[2.0], [0.0]])
    q, _ = net(obs)
    h, _ = net.encode(obs)
    v = net.value(h)
    # Q - V averages to zero over the catalogue; differences between items are the advantages' differences
    torch.testing.assert_close((q - v).mean(1), torch.zeros(2), rtol=0, atol=1e-6)
    adv = h @ (net.item_out.weight + net.genre_out(net.item_genres[:7])).T + net.item_bias
    torch.testing.assert_close(q - q[:, :1], adv - adv[:, :1])


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="q_net must be one of mlp, moe"):
        QNetworkConfig(num_items=3, q_net="rnn")
    with pytest.raises(ValueError, match="user_feature_sizes"):
        QNetworkConfig(num_items=3, user_feature_sizes=[])
    with pytest.raises(ValueError, match=r"item_genres must have shape \(7, 3\)"):
        _net().set_item_genres(np.ones((7, 2)))
