"""Masked flow-matching loss (VIVA eq. 3), noise schedule helpers, mask resizing."""
import pytest
import torch

from viva_base.losses import add_noise, mask_to_latent, masked_flow_matching_loss, sample_sigmas


def test_masked_loss_hand_computed():
    v = torch.tensor([[[[[1.0, 2.0]]]]])          # (1, 1, 1, 1, 2)
    target = torch.tensor([[[[[0.0, 0.0]]]]])
    mask = torch.tensor([[[[[1.0, 0.0]]]]])
    # (1 + 3*1) * 1^2 = 4 and (1 + 0) * 2^2 = 4 -> mean 4
    assert masked_flow_matching_loss(v, target, mask, w_m=3.0).item() == 4.0
    # w_m = 0: the plain flow-matching loss, mean of squares (1 + 4) / 2
    assert masked_flow_matching_loss(v, target, mask, w_m=0.0).item() == 2.5
    assert masked_flow_matching_loss(v, target, None, w_m=3.0).item() == 2.5


def test_masked_loss_matches_independent_loop():
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    m = (torch.rand(2, 1, 2, 4, 4, generator=g) > 0.5).float()
    total, count = 0.0, 0
    for b in range(2):
        for c in range(3):
            for f in range(2):
                for i in range(4):
                    for j in range(4):
                        total += (1 + 2.5 * m[b, 0, f, i, j].item()) * (v[b, c, f, i, j] - t[b, c, f, i, j]).item() ** 2
                        count += 1
    assert abs(masked_flow_matching_loss(v, t, m, 2.5).item() - total / count) < 1e-5


def test_mask_to_latent_groups_causal_frames():
    mask = torch.zeros(1, 9, 1, 16, 16)
    mask[0, 2, 0, 0, 0] = 1      # frame 2 -> latent frame 1 (frames 1..4), cell (0, 0)
    mask[0, 8, 0, 15, 15] = 1    # frame 8 -> latent frame 2 (frames 5..8), last cell
    lat = mask_to_latent(mask, (3, 2, 2), temporal_ratio=4)
    assert lat.shape == (1, 1, 3, 2, 2)
    expected = torch.zeros(1, 1, 3, 2, 2)
    expected[0, 0, 1, 0, 0] = 1
    expected[0, 0, 2, 1, 1] = 1
    assert torch.equal(lat, expected)
    # no temporal compression (pixel VAE): frames map one to one, space is max-pooled
    lat1 = mask_to_latent(mask, (9, 8, 8))
    assert lat1[0, 0, 2, 0, 0] == 1 and lat1.sum() == 2


def test_add_noise_endpoints_and_sigma_range():
    z, n = torch.randn(2, 3, 1, 2, 2), torch.randn(2, 3, 1, 2, 2)
    out = add_noise(z, n, torch.tensor([0.0, 1.0]))
    assert torch.equal(out[0], z[0]) and torch.equal(out[1], n[1])
    s = sample_sigmas(1000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert (s > 0).all() and (s < 1).all()
    u = sample_sigmas(4, shift=1.0, method="uniform", generator=torch.Generator().manual_seed(1))
    assert torch.equal(u, torch.rand(4, generator=torch.Generator().manual_seed(1)))


def test_x0_loss_weighting_is_the_clean_latent_error():
    """sigma^2 ||v_pred - v*||^2 = ||x0_pred - x0||^2 with x0_pred = z_sigma - sigma v_pred (per sample, exactly)."""
    from viva_base.losses import add_noise, masked_flow_matching_loss, sigma_loss_weight

    g = torch.Generator().manual_seed(0)
    x0, noise, v_pred = (torch.randn(3, 4, 2, 3, 3, generator=g) for _ in range(3))
    sigma = torch.tensor([0.9, 0.4, 0.05])
    z = add_noise(x0, noise, sigma)
    x0_pred = z - sigma.view(-1, 1, 1, 1, 1) * v_pred
    got = masked_flow_matching_loss(v_pred, noise - x0, None, 0.0, sample_weight=sigma_loss_weight(sigma, "x0"))
    assert torch.allclose(got, ((x0_pred - x0) ** 2).mean(), rtol=1e-5)
    mask = (torch.rand(3, 1, 2, 3, 3, generator=g) > 0.5).float()
    got_m = masked_flow_matching_loss(v_pred, noise - x0, mask, 2.0, sample_weight=sigma_loss_weight(sigma, "x0"))
    assert torch.allclose(got_m, ((1 + 2 * mask) * (x0_pred - x0) ** 2).mean(), rtol=1e-5)
    assert sigma_loss_weight(sigma, "none") is None
    with pytest.raises(ValueError):
        sigma_loss_weight(sigma, "snr")
    # capped: the clean-latent weight 1/sigma^2 of the velocity loss, capped at 25 (sigma < 0.2): velocity weights
    # 1, 1, 25 * 0.05^2 = 0.0625, i.e. the x0 errors weigh 1/0.81, 1/0.16 and 25
    assert torch.allclose(sigma_loss_weight(sigma, "capped", 25.0), torch.tensor([1.0, 1.0, 0.0625]))
    got_c = masked_flow_matching_loss(v_pred, noise - x0, None, 0.0, sample_weight=sigma_loss_weight(sigma, "capped"))
    x0_w = torch.tensor([1 / 0.81, 1 / 0.16, 25.0]).view(-1, 1, 1, 1, 1)
    assert torch.allclose(got_c, (x0_w * (x0_pred - x0) ** 2).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="cap must be > 0"):
        sigma_loss_weight(sigma, "capped", 0.0)


def test_area_normalized_masked_loss_matches_a_per_sample_loop():
    """normalization="area": per sample mean outside + (1 + w_m) mean inside, then the mean over samples; a
    sample without edited elements keeps its outside mean only."""
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(3, 2, 1, 4, 4, generator=g), torch.randn(3, 2, 1, 4, 4, generator=g)
    m = torch.zeros(3, 1, 1, 4, 4)
    m[0, 0, 0, :3, :] = 1       # 12 of 16 cells
    m[1, 0, 0, 0, 0] = 1        # 1 of 16
    # sample 2: no edit
    w = torch.tensor([1.0, 0.5, 2.0])
    expected = 0.0
    for b in range(3):
        inside, outside = [], []
        for c in range(2):
            for i in range(4):
                for j in range(4):
                    (inside if m[b, 0, 0, i, j] else outside).append((v[b, c, 0, i, j] - t[b, c, 0, i, j]).item() ** 2)
        term = sum(outside) / len(outside) + (3.0 * sum(inside) / len(inside) if inside else 0.0)
        expected += w[b].item() * term / 3
    got = masked_flow_matching_loss(v, t, m, 2.0, sample_weight=w, normalization="area")
    assert abs(got.item() - expected) < 1e-5


def test_area_normalization_makes_a_small_edit_count_as_much_as_a_large_one():
    """Eq. 3 as written weighs a sample's edit error by its area; "area" does not."""
    v = torch.zeros(2, 1, 1, 4, 4)
    t = torch.zeros(2, 1, 1, 4, 4)
    m = torch.zeros(2, 1, 1, 4, 4)
    m[0, 0, 0, :, :2] = 1   # half the frame
    m[1, 0, 0, 0, 0] = 1    # one cell
    t[m.bool().expand_as(t)] = 1.0  # the same unit error on every edited element, none elsewhere
    def per_sample(norm):
        return [masked_flow_matching_loss(v[i:i + 1], t[i:i + 1], m[i:i + 1], 2.0, normalization=norm).item()
                for i in range(2)]
    big, small = per_sample("none")
    assert big == pytest.approx(8 * small)          # 8 cells vs 1
    assert per_sample("area") == pytest.approx([3.0, 3.0])
    with pytest.raises(ValueError):
        masked_flow_matching_loss(v, t, m, 2.0, normalization="pixels")


def test_balanced_normalization_keeps_eq3_budget_and_shares_it_evenly():
    """normalization="balanced": the batch's total edit and preservation weights are eq. 3's, but each sample's
    edit gets the same share whatever its area (checked on the gradients, an independent route)."""
    m = torch.zeros(2, 1, 1, 4, 4)
    m[0, 0, 0, :3, :] = 1   # a "background" edit: 12 of 16 cells
    m[1, 0, 0, 0, 0] = 1    # an object edit: 1 of 16
    t = torch.zeros(2, 1, 1, 4, 4)
    inside = m.bool()
    for err_in, err_out in ((1.0, 0.0), (0.0, 1.0)):  # unit error only inside / only outside the edits
        v = torch.where(inside, torch.tensor(err_in), torch.tensor(err_out))
        eq3 = masked_flow_matching_loss(v, t, m, 2.0).item()
        assert masked_flow_matching_loss(v, t, m, 2.0, normalization="balanced").item() == pytest.approx(eq3)
    v = torch.full_like(t, 0.5).requires_grad_(True)
    masked_flow_matching_loss(v, t, m, 2.0, normalization="balanced").backward()
    edit_grad = [v.grad[i][inside[i]].sum().item() for i in range(2)]
    assert edit_grad[0] == pytest.approx(edit_grad[1])           # the same share for a 12-cell and a 1-cell edit
    v.grad = None
    masked_flow_matching_loss(v, t, m, 2.0).backward()
    eq3_grad = [v.grad[i][inside[i]].sum().item() for i in range(2)]
    assert eq3_grad[0] == pytest.approx(12 * eq3_grad[1])          # eq. 3: proportional to the area
