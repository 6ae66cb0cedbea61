"""ADTR+ losses against hand-computed values."""
import math

import torch

from adtr_edge.model.losses import image_topk_loss, pixel_push_pull_loss, pseudo_huber_distance
from adtr_edge.model.reconstructor import reconstruction_loss


def test_pseudo_huber_distance_matches_formula():
    target = torch.zeros(1, 2, 1, 2)
    recon = torch.tensor([[[[1.0, 0.0]], [[3.0, 0.0]]]])  # |d| mean over C: position 0 → 2, position 1 → 0
    phi = pseudo_huber_distance(target, recon)
    assert phi.shape == (1, 1, 2)
    assert torch.allclose(phi, torch.tensor([[[math.sqrt(5) - 1, 0.0]]]))


def test_reconstruction_loss_is_mse():
    target, recon = torch.zeros(2, 3, 2, 2), torch.full((2, 3, 2, 2), 2.0)
    assert reconstruction_loss(target, recon).item() == 4.0


def test_pixel_loss_all_normal_batch_is_the_mean_error_and_finite():
    phi = torch.tensor([[[0.5, 1.5], [0.0, 2.0]]])  # (1, 2, 2)
    loss = pixel_push_pull_loss(phi, torch.zeros_like(phi), alpha=0.003)
    assert torch.isfinite(loss)
    assert loss.item() == (0.5 + 1.5 + 0.0 + 2.0) / 4


def test_pixel_loss_all_anomalous_batch_pushes_only():
    phi = torch.full((1, 2, 2), 0.7)
    loss = pixel_push_pull_loss(phi, torch.ones_like(phi), alpha=0.5)
    expected = -0.5 * math.log(1 - math.exp(-0.7))
    assert abs(loss.item() - expected) < 1e-6


def test_pixel_loss_mixed_sample_by_hand():
    phi = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    mask = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    expected = (1 + 2 + 3) / 4 - 0.003 * math.log(1 - math.exp(-4 / 4))
    assert abs(pixel_push_pull_loss(phi, mask).item() - expected) < 1e-6


def test_pixel_loss_guards_log_of_zero():
    phi = torch.zeros(1, 2, 2, requires_grad=True)
    loss = pixel_push_pull_loss(phi, torch.ones(1, 2, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(phi.grad).all()


def test_pixel_loss_push_gradient_raises_anomalous_error():
    phi = torch.full((1, 2, 2), 0.2, requires_grad=True)
    pixel_push_pull_loss(phi, torch.ones(1, 2, 2)).backward()
    assert (phi.grad < 0).all()  # descending the loss increases φ on anomalous positions


def test_image_loss_topk_by_hand():
    phi = torch.arange(6.0).view(2, 1, 3)  # sample 0: 0,1,2; sample 1: 3,4,5
    labels = torch.tensor([0, 1])
    q0, q1 = (2 + 1) / 2, (5 + 4) / 2
    expected = (q0 + (-0.1 * math.log(1 - math.exp(-q1)))) / 2
    assert abs(image_topk_loss(phi, labels, alpha=0.1, k=2).item() - expected) < 1e-6


def test_image_loss_all_normal_and_all_anomalous_batches():
    phi = torch.full((3, 2, 2), 0.3)
    assert abs(image_topk_loss(phi, torch.zeros(3), k=4).item() - 0.3) < 1e-6
    expected = -0.003 * math.log(1 - math.exp(-0.3))
    assert abs(image_topk_loss(phi, torch.ones(3), k=4).item() - expected) < 1e-6
    zero = image_topk_loss(torch.zeros(2, 2, 2), torch.ones(2))
    assert torch.isfinite(zero)
