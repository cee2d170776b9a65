"""Losses: hand-computed cases, a slow reference loop, MONAI as an independent implementation,
and finite gradients."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import shared_file, smooth_image

from unireg import losses as L
from unireg.io.image import load_image, normalize_intensity


def lncc_reference(a: torch.Tensor, b: torch.Tensor, w: int, eps: float) -> float:
    """Slow LNCC^2: a loop over voxels, zero padding, full-window normalisation."""
    r = w // 2
    a0, b0 = a[0, 0].numpy(), b[0, 0].numpy()
    pad = [(r, r)] * a0.ndim
    ap, bp = np.pad(a0, pad), np.pad(b0, pad)
    n = w**a0.ndim
    values = []
    for idx in itertools.product(*[range(s) for s in a0.shape]):
        win = tuple(slice(i, i + w) for i in idx)
        x, y = ap[win].ravel(), bp[win].ravel()
        cross = (x * y).sum() - x.sum() * y.sum() / n
        va = (x * x).sum() - x.sum() ** 2 / n
        vb = (y * y).sum() - y.sum() ** 2 / n
        values.append(cross**2 / (va * vb + eps))
    return float(np.mean(values))


@pytest.mark.parametrize("shape,window", [((9, 8, 7), 5), ((13, 11), 3), ((10, 12), 7)])
def test_lncc_equals_slow_reference_loop(shape, window):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    b = a**2 + 0.3 * torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    ours = 1.0 - float(L.lncc(a, b, window, eps=1e-5))
    assert ours == pytest.approx(lncc_reference(a, b, window, 1e-5), abs=1e-10)


def test_lncc_perfect_for_local_affine_intensity_relation():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 1, 20, 18, 16, generator=g, dtype=torch.float64)
    # whole windows: exactly 1 for any affine intensity relation
    cc = L.lncc_map(a, 3 * a - 1, 7, padding="valid", eps=1e-12)
    assert cc.shape == (1, 1, 14, 12, 10)
    assert torch.allclose(cc, torch.ones_like(cc), atol=1e-9)
    assert float(L.lncc(a, 2 * a, 7)) < 1e-6  # zero padding is harmless without an offset
    b = torch.rand(a.shape, generator=g, dtype=torch.float64)
    # independent noise: E[LNCC^2] over whole 7^3 windows is about 1/343
    assert float(L.lncc_map(a, b, 7, padding="valid").mean()) < 0.01
    assert float(L.lncc(a, b, 7)) > 0.5  # zero-padded border windows correlate through the pad


def test_against_monai():
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 12, 14, 10, generator=g, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ref = monai_losses.LocalNormalizedCrossCorrelationLoss(
        spatial_dims=3, kernel_size=5, kernel_type="rectangular", smooth_nr=0.0, smooth_dr=1e-5
    )(a, b)
    # MONAI returns -mean(LNCC^2); ours is 1 - mean(LNCC^2)
    assert float(L.lncc(a, b, 5, eps=0.0)) - 1 == pytest.approx(float(ref), abs=1e-9)
    mi_ref = monai_losses.GlobalMutualInformationLoss(num_bins=23, sigma_ratio=0.5)(a, b)
    assert float(L.mutual_information(a, b, bins=23)) == pytest.approx(float(mi_ref), abs=1e-4)
    u = torch.randn(2, 3, 9, 10, 11, generator=g, dtype=torch.float64)
    be = monai_losses.BendingEnergyLoss(normalize=False)(u)
    assert float(L.bending_energy(u)) == pytest.approx(float(be), rel=1e-12)
    u2 = torch.randn(2, 2, 9, 10, generator=g, dtype=torch.float64)
    be2 = monai_losses.BendingEnergyLoss(normalize=False)(u2)
    assert float(L.bending_energy(u2)) == pytest.approx(float(be2), rel=1e-12)


def test_global_ncc_and_mse_hand_cases():
    a = smooth_image((10, 11, 12), seed=1)
    assert float(L.ncc(a, 2 * a + 5)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.ncc(a, -a)) == pytest.approx(2.0, abs=1e-6)
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    y = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert float(L.mse(x, y)) == pytest.approx((1 + 0 + 4 + 9) / 4)
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert float(L.mse(x, y, mask=mask)) == pytest.approx(0.5)
    # NCC within a mask ignores what lies outside it
    noisy = a.clone()
    m = torch.zeros_like(a)
    m[..., :6] = 1
    noisy[..., 6:] = torch.rand(noisy[..., 6:].shape, dtype=torch.float64)
    assert float(L.ncc(a, noisy, mask=m)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.ncc(a, noisy)) > 0.05
    assert float(L.lncc(a, noisy, 3, mask=m[..., :, :, :])) < float(L.lncc(a, noisy, 3))


def test_multi_kernel_lncc():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 1, 40, 36, 32, generator=g, dtype=torch.float64)
    assert float(L.multi_kernel_lncc(a, 0.5 * a + 0.2, eps=1e-12)) < 1e-9
    b = smooth_image((40, 36, 32), seed=5)
    value = float(L.multi_kernel_lncc(a, b))
    assert 0.9 < value <= 1.0
    # one kernel, weight 1: the mean of the valid-window LNCC^2 map at the AVSM stride
    single = float(L.multi_kernel_lncc(a, b, windows=(5,), weights=(1.0,), dilation=1))
    ref = L.lncc_map(a, b, 5, stride=(5 + 1) // 4, padding="valid").mean()
    assert single == pytest.approx(1 - float(ref), abs=1e-10)
    # a window larger than the image shrinks to the image: one whole-image window = NCC^2
    tiny_a, tiny_b = a[..., :9, :9, :9], b[..., :9, :9, :9]
    whole = float(L.multi_kernel_lncc(tiny_a, tiny_b, (15,), (1.0,), eps=1e-12))
    assert whole == pytest.approx(1 - (1 - float(L.ncc(tiny_a, tiny_b, eps=0))) ** 2, abs=1e-9)


def _ixi_slice() -> torch.Tensor:
    path = shared_file("ixi", "t1", "IXI012-HH-1211-T1_ds.nii.gz")
    img = normalize_intensity(load_image(path))
    return img.data[:, :, :, img.shape[2] // 2].unsqueeze(0).double()  # (1, 1, X, Y)


def test_mutual_information_prefers_remapped_pair_and_peaks_at_alignment():
    a = _ixi_slice()
    remapped = 1.0 - a**2  # a non-monotone-free but nonlinear intensity remapping
    g = torch.Generator().manual_seed(0)
    unrelated = torch.rand(a.shape, generator=g, dtype=torch.float64)
    mi_remap = -float(L.mutual_information(a, remapped))
    mi_unrel = -float(L.mutual_information(a, unrelated))
    assert mi_remap > 5 * mi_unrel
    # shifted copies: MI is largest at zero shift, along both axes
    for axis in (2, 3):
        values = {}
        for s in range(-4, 5):
            shifted = torch.roll(remapped, s, dims=axis)
            values[s] = -float(L.mutual_information(a, shifted))
        assert max(values, key=values.get) == 0
        assert values[0] > values[2] > values[4]
        assert values[0] > values[-2] > values[-4]


def test_mutual_information_sampling_and_mask():
    a = _ixi_slice()
    full = float(L.mutual_information(a, a))
    g = torch.Generator().manual_seed(1)
    sampled = float(L.mutual_information(a, a, samples=4000, generator=g))
    assert sampled == pytest.approx(full, rel=0.05)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert float(L.mutual_information(a, a, samples=500, generator=g1)) == float(
        L.mutual_information(a, a, samples=500, generator=g2)
    )
    with pytest.raises(ValueError, match="mask selects no voxel"):
        L.mutual_information(a, a, mask=torch.zeros_like(a))


def test_one_hot_and_soft_dice():
    lab = torch.tensor([[[[0, 10, 10], [30, 30, 99]]]])
    oh = L.one_hot(lab, [10, 0, 30])
    assert oh.shape == (1, 3, 2, 3)
    assert oh[0, 0].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert oh[0, 2].tolist() == [[0, 0, 0], [1, 1, 0]]
    assert oh[0, :, 1, 2].sum() == 0  # 99 is not listed: no channel
    assert float(L.soft_dice(oh, oh)) == pytest.approx(0.0, abs=1e-6)
    other = L.one_hot(torch.tensor([[[[0, 10, 0], [30, 30, 30]]]]), [10, 0, 30])
    # per class: 10 -> 2*1/(2+1); 0 -> 2*1/(1+2); 30 -> 2*2/(2+3)
    expected = 1 - np.mean([2 / 3, 2 / 3, 4 / 5])
    assert float(L.soft_dice(oh, other)) == pytest.approx(expected, abs=1e-5)


def test_regularisers_hand_cases():
    # linear field u_c(x) = a_c * x_axis0: forward differences are a_c along axis 0 only
    shape = (6, 7, 8)
    x0 = torch.arange(shape[0], dtype=torch.float64).view(1, 1, -1, 1, 1).expand(1, 1, *shape)
    coef = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    u = coef * x0
    # mean over axes (1/3) of the mean squared difference (mean over components of a_c^2)
    expected = (0.25 + 1 + 4) / 3 / 3
    assert float(L.diffusion(u)) == pytest.approx(expected)
    assert float(L.bending_energy(u)) == pytest.approx(0.0, abs=1e-12)  # affine: no bending
    # quadratic u_0 = x0^2: d2/dx0^2 = 2 everywhere -> energy 4 in component 0, mean over 3
    u2 = torch.zeros(1, 3, *shape, dtype=torch.float64)
    u2[:, 0] = x0[:, 0] ** 2
    assert float(L.bending_energy(u2)) == pytest.approx(4 / 3)
    # mixed term: u_0 = x0 * x1 -> d2/dx0dx1 = 1, counted twice
    x1 = torch.arange(shape[1], dtype=torch.float64).view(1, -1, 1).expand(shape)
    u3 = torch.zeros(1, 3, *shape, dtype=torch.float64)
    u3[0, 0] = x0[0, 0] * x1
    assert float(L.bending_energy(u3)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="displacement"):
        L.diffusion(torch.zeros(1, 2, 4, 4, 4))


@pytest.mark.parametrize("ndim", [2, 3])
def test_losses_have_finite_gradients(ndim):
    shape = (12, 10, 9)[:ndim]
    a = smooth_image(shape, seed=1).float()
    b = smooth_image(shape, seed=2).float().requires_grad_(True)
    const = torch.full_like(a, 0.5).requires_grad_(True)
    for name in ["mse", "ncc", "lncc", "mi"]:
        fn = L.get_loss(name)
        for target in (b, const):
            value = fn(a, target)
            (grad,) = torch.autograd.grad(value, target)
            assert torch.isfinite(value) and torch.isfinite(grad).all(), name
    big = torch.rand(1, 1, *[40] * ndim, requires_grad=True)
    value = L.get_loss("mk-lncc")(big.detach() ** 2, big)
    (grad,) = torch.autograd.grad(value, big)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    probs = torch.softmax(torch.randn(1, 4, *shape), 1).requires_grad_(True)
    target = L.one_hot(torch.randint(0, 4, (1, 1, *shape)), range(4))
    (grad,) = torch.autograd.grad(L.soft_dice(probs, target), probs)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    u = torch.randn(1, ndim, *shape, requires_grad=True)
    for name in ["diffusion", "bending"]:
        (grad,) = torch.autograd.grad(L.get_loss(name)(u), u)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_loss_registry_and_reduction():
    a = smooth_image((8, 8, 8), seed=1).repeat(3, 1, 1, 1, 1)
    b = smooth_image((8, 8, 8), seed=2).repeat(3, 1, 1, 1, 1)
    per = L.get_loss("lncc", window=3)(a, b, reduction="none")
    assert per.shape == (3,)
    assert float(per.mean()) == pytest.approx(float(L.lncc(a, b, 3)))
    with pytest.raises(ValueError, match="unknown loss"):
        L.get_loss("ssim")
    with pytest.raises(ValueError, match="shapes differ"):
        L.mse(a, b[..., :4])


def test_gradcheck_lncc_mi_ncc():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(1, 1, 6, 5, 4, generator=g, dtype=torch.float64)
    b = torch.rand(1, 1, 6, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: L.lncc(a, x, 3), (b,))
    assert torch.autograd.gradcheck(lambda x: L.ncc(a, x), (b,))
    assert torch.autograd.gradcheck(lambda x: L.mutual_information(a, x, bins=8), (b,))
    assert torch.autograd.gradcheck(lambda x: L.multi_kernel_lncc(a, x, (3,), (1.0,)), (b,))


def _mi_reference(a, b, bins, mask=None):
    """Plain autograd MI (all voxels at once): the definition the chunked version implements."""
    xa, xb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    centers = torch.linspace(0, 1, bins, dtype=a.dtype)
    sigma = 0.5 / (bins - 1)

    def weights(x):
        z = (x.clamp(0, 1).unsqueeze(-1) - centers) / sigma
        w = torch.exp(-0.5 * z * z)
        return w / w.sum(-1, keepdim=True)

    wn = torch.ones_like(xa) if mask is None else mask.expand_as(a).reshape(a.shape[0], -1)
    wn = (wn / wn.sum(1, keepdim=True)).unsqueeze(-1)
    wa, wb = weights(xa) * wn, weights(xb)
    pab = torch.bmm(wa.transpose(1, 2), wb)
    pa, pb = wa.sum(1), (wb * wn).sum(1)
    papb = pa.unsqueeze(2) * pb.unsqueeze(1)
    return -(pab * torch.log((pab + 1e-10) / (papb + 1e-10))).sum((1, 2)).mean()


@pytest.mark.parametrize("keep", [True, False], ids=["weights-kept", "weights-recomputed"])
def test_chunked_mutual_information_matches_plain_autograd(keep, monkeypatch):
    if not keep:  # the backward recomputes each chunk's Parzen weights (large inputs)
        monkeypatch.setattr(L, "_MI_KEEP_ELEMENTS", 0)
    g = torch.Generator().manual_seed(8)
    a = smooth_image((14, 12, 10), seed=1) + 0.1 * torch.rand(1, 1, 14, 12, 10, generator=g)
    a = (a / a.max()).repeat(2, 1, 1, 1, 1).requires_grad_(True)
    b = (1 - a.detach() ** 2 + 0.05 * torch.rand(a.shape, generator=g, dtype=a.dtype)).clamp(0, 1)
    b = b.requires_grad_(True)
    mask = (torch.rand(2, 1, 14, 12, 10, generator=g, dtype=a.dtype) > 0.3).to(a.dtype)
    for m in (None, mask):
        ours = L.mutual_information(a, b, bins=16, mask=m, chunk=97)  # chunks not dividing N
        ref = _mi_reference(a, b, 16, m)
        assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
        ga, gb = torch.autograd.grad(ours, (a, b))
        ra, rb = torch.autograd.grad(ref, (a, b))
        assert torch.allclose(ga, ra, rtol=1e-7, atol=1e-12)
        assert torch.allclose(gb, rb, rtol=1e-7, atol=1e-12)
    # values strictly inside the range (the clip at 0 and 1 has a kink finite differences see)
    small_a = 0.1 + 0.8 * torch.rand(1, 1, 4, 4, 3, generator=g, dtype=torch.float64)
    small_b = 0.1 + 0.8 * torch.rand(1, 1, 4, 4, 3, generator=g, dtype=torch.float64)
    small_a.requires_grad_(True)
    small_b.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, y: L.mutual_information(x, y, bins=6, chunk=5), (small_a, small_b)
    )


@pytest.mark.slow
def test_mutual_information_aligns_a_real_t1_t2_pair():
    """IXI002's T1 and T2 (separate acquisitions of one session, each on its own oblique grid)
    brought onto one 2 mm grid through their world affines: MI is largest at no shift."""
    from unireg.data import Manifest, Preprocessing, VolumeDataset
    from unireg.io.image import resample

    entries = Manifest.read(shared_file("manifest.csv")).select(dataset="ixi002")
    ds = VolumeDataset(entries, Preprocessing(spacing=2.0, shape=(96, 112, 96), center="fov"))
    t1, t2 = ds.image(0), ds.image(1)
    a, b = t1.data[None], resample(t2, t1.geometry).data[None]
    at_zero = -float(L.mutual_information(a, b))
    for axis in (2, 3, 4):
        for shift in (-2, 2):
            assert -float(L.mutual_information(a, torch.roll(b, shift, dims=axis))) < at_zero
