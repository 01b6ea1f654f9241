"""IDRouter logits, route() (argmax / straight-through Gumbel), routing_loss, schedule_tau."""
from __future__ import annotations

import math

import pytest
import torch

from src.models.router import IDRouter, resize_masks_binary, route, routing_loss, schedule_tau


def test_router_submodule_names_match_released_keys() -> None:
    router = IDRouter(hidden_dim=8, id_dim=6, num_tokens=4)
    shapes = {k: tuple(v.shape) for k, v in router.state_dict().items()}
    assert shapes == {
        "to_q_router.0.weight": (16, 8), "to_q_router.0.bias": (16,), "to_q_router.2.weight": (8, 16),
        "to_k_router.0.weight": (12, 6), "to_k_router.0.bias": (12,), "to_k_router.2.weight": (8, 12),
        "aggr_router.weight": (1, 4), "aggr_router.bias": (1,),
    }


def test_logits_are_plain_dot_product_of_theta_and_phi_of_aggregated_tokens() -> None:
    torch.manual_seed(0)
    router = IDRouter(hidden_dim=8, id_dim=6, num_tokens=4)
    hidden, tokens = torch.randn(2, 5, 8), torch.randn(2, 3, 4, 6)
    logits = router.logits(hidden, tokens)
    assert logits.shape == (2, 5, 3)
    # independent formulation: weighted token sum by W_aggr, no 1/sqrt(d)
    aggr = (tokens * router.aggr_router.weight[0][None, None, :, None]).sum(2) + router.aggr_router.bias
    expected = router.to_q_router(hidden) @ router.to_k_router(aggr).transpose(1, 2)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokens must be"):
        router.logits(hidden, torch.randn(2, 3, 5, 6))


def test_route_argmax_is_one_hot_and_never_picks_padded_identities() -> None:
    logits = torch.tensor([[[0.0, 1.0, 9.0], [2.0, 1.0, 9.0]]])  # (1, 2, 3); slot 2 has the top logit
    valid = torch.tensor([[True, True, False]])
    probs, weights = route(logits, valid, gumbel_tau=None)
    assert torch.equal(weights, torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]]))
    assert not weights.requires_grad
    assert torch.all(probs[..., 2] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2))
    torch.testing.assert_close(probs[..., :2], torch.softmax(logits[..., :2], -1))


def test_route_gumbel_forward_is_one_hot_over_valid_and_sums_to_one() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50, 3) * 3
    logits[:, :, 2] += 100.0  # padded slot would win every time if it were not masked
    valid = torch.tensor([[True, True, False], [True, False, False], [False, False, False], [True, True, True]])
    valid[3, 2] = False
    probs, weights = route(logits, valid, gumbel_tau=0.5)
    assert set(weights.detach().unique().tolist()) <= {0.0, 1.0}
    sums = weights.detach().sum(-1)  # (B, L)
    assert torch.equal(sums[[0, 1, 3]], torch.ones(3, 50))
    assert torch.equal(sums[2], torch.zeros(50))  # no valid identity: nothing injected, no NaN
    assert torch.all(weights.detach()[..., 2] == 0) and torch.all(probs[..., 2] == 0)
    assert torch.equal(weights.detach()[1, :, 0], torch.ones(50))  # one valid identity -> weight 1
    assert not torch.isnan(probs).any()


def test_gumbel_samples_follow_the_softmax_distribution() -> None:
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.8, 0.2])).expand(1, 20000, 2)
    _, weights = route(logits, torch.ones(1, 2, dtype=torch.bool), gumbel_tau=1.0)
    freq = weights.detach()[0, :, 0].mean().item()
    assert abs(freq - 0.8) < 0.02
    _, hard = route(logits, torch.ones(1, 2, dtype=torch.bool), gumbel_tau=None)
    assert hard[0, :, 0].mean().item() == 1.0  # argmax is deterministic


def test_gradients_reach_all_router_parts_through_gumbel_path() -> None:
    torch.manual_seed(0)
    router = IDRouter(hidden_dim=8, id_dim=6, num_tokens=4)
    hidden, tokens = torch.randn(2, 10, 8), torch.randn(2, 3, 4, 6)
    _, weights = route(router.logits(hidden, tokens), torch.ones(2, 3, dtype=torch.bool), gumbel_tau=1.0)
    (weights * torch.randn_like(weights)).sum().backward()
    for name, p in router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_resize_masks_binary_area_then_threshold() -> None:
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, :8, :8] = 1  # exactly 2x2 cells at 4x4
    masks[0, 1, 8:11, 8:11] = 1  # 9 px: covers 9/16 of one 4x4 cell -> kept there; less elsewhere
    small = resize_masks_binary(masks, (4, 4))
    assert set(small.unique().tolist()) <= {0.0, 1.0}
    assert small[0, 0].sum() == 4 and torch.all(small[0, 0, :2, :2] == 1)
    assert small[0, 1].sum() == 1 and small[0, 1, 2, 2] == 1


def _two_face_setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks (2, 3, 8, 8): face A on the left, face B on the right, slot 2 padded; psi random."""
    torch.manual_seed(0)
    masks = torch.zeros(2, 3, 8, 8)
    masks[:, 0, 2:5, 0:3] = 1
    masks[:, 1, 2:5, 5:8] = 1
    valid = torch.tensor([[True, True, False], [True, True, False]])
    psi = torch.softmax(torch.randn(2, 2, 8, 8), dim=1)
    psi = torch.cat([psi, torch.zeros(2, 1, 8, 8)], 1)  # padded slot has psi 0 (as route() gives)
    return masks, valid, psi


def test_routing_loss_ignores_everything_outside_faces() -> None:
    masks, valid, psi = _two_face_setup()
    base = routing_loss([psi], masks, valid)
    outside = masks.amax(1, keepdim=True) == 0  # (B, 1, h, w)
    other = torch.softmax(torch.randn(2, 2, 8, 8) * 5, dim=1)
    psi2 = psi.clone()
    psi2[:, :2] = torch.where(outside, other, psi[:, :2])
    assert not torch.equal(psi, psi2)
    assert torch.equal(routing_loss([psi2], masks, valid), base)


def test_routing_loss_zero_for_perfect_router_positive_otherwise_scales_with_lambda() -> None:
    masks, valid, psi = _two_face_setup()
    inside = masks.amax(1, keepdim=True) > 0
    perfect = torch.where(inside, masks, psi)  # psi == M inside the faces, anything elsewhere
    assert routing_loss([perfect], masks, valid).item() == 0.0
    loss = routing_loss([psi], masks, valid, lam=0.1)
    assert loss > 0
    torch.testing.assert_close(routing_loss([psi], masks, valid, lam=0.3), 3 * loss)


def test_routing_loss_sums_over_positions_not_mean() -> None:
    masks, valid, _ = _two_face_setup()
    uniform = torch.cat([torch.full((2, 2, 8, 8), 0.5), torch.zeros(2, 1, 8, 8)], 1)
    # each face position: (0.5 - 1)^2 + (0.5 - 0)^2 = 0.5 ; 18 face positions ; N = 2 valid
    expected = 0.1 / 2 * 0.5 * 18
    torch.testing.assert_close(routing_loss([uniform], masks, valid, lam=0.1), torch.tensor(expected))
    # averaging over layers: a second, coarser layer (4x4) adds its own term
    coarse = torch.cat([torch.full((2, 2, 4, 4), 0.5), torch.zeros(2, 1, 4, 4)], 1)
    two = routing_loss([uniform, coarse], masks, valid, lam=0.1)
    single_coarse = routing_loss([coarse], masks, valid, lam=0.1)
    torch.testing.assert_close(two, (torch.tensor(expected) + single_coarse) / 2)


def test_routing_loss_zero_for_samples_with_fewer_than_two_identities() -> None:
    masks, _, psi = _two_face_setup()
    valid = torch.tensor([[True, False, False], [True, True, False]])
    per_b1 = routing_loss([psi[1:]], masks[1:], valid[1:])
    both = routing_loss([psi], masks, valid)
    torch.testing.assert_close(both, per_b1 / 2)  # sample 0 contributes 0, average over samples
    assert routing_loss([psi[:1]], masks[:1], valid[:1]).item() == 0.0


def test_routing_loss_has_gradient_to_psi_and_checks_shapes() -> None:
    masks, valid, psi = _two_face_setup()
    psi = psi.clone().requires_grad_(True)
    routing_loss([psi], masks, valid).backward()
    assert psi.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="probs\\[0\\]"):
        routing_loss([psi[:, :2]], masks, valid)


def test_schedule_tau() -> None:
    assert schedule_tau(0, 1.0, 0.1, 100) == pytest.approx(1.0)
    assert schedule_tau(100, 1.0, 0.1, 100) == pytest.approx(0.1)
    assert schedule_tau(500, 1.0, 0.1, 100) == pytest.approx(0.1)
    assert schedule_tau(50, 1.0, 0.1, 100) == pytest.approx(math.sqrt(0.1))
    assert schedule_tau(50, 1.0, 0.1, 100, mode="linear") == pytest.approx(0.55)
    values = [schedule_tau(s, 2.0, 0.5, 10) for s in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        schedule_tau(0, 0.0, 0.1, 10)
