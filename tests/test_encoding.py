import numpy as np
import pytest
import torch

from py4dstem_deepcdi.encoding import fourier_shift, neighbour_sum, network_input, pooled_illumination, remove_mask_mean
from py4dstem_deepcdi.simulation import ForwardModel


def random_phase(n, seed=0, shape=(32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g) * 2 - 1


def test_network_input_is_dose_independent(geometry):
    model = ForwardModel(geometry)
    intensity = model.intensity(random_phase(2))
    a = network_input(intensity * 1e5, 1e5)
    b = network_input(intensity * 1e3, 1e3)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)
    assert float((a**2).sum((-2, -1)).mean()) == pytest.approx(1024, rel=1e-5)
    counts = torch.tensor([[[-1.0, 4.0], [0.0, 1.0]]])
    copy = counts.clone()
    np.testing.assert_allclose(network_input(counts, 4.0).numpy(), [[[0.0, 2.0], [0.0, 1.0]]])
    torch.testing.assert_close(counts, copy)  # the caller's counts are not modified
    out = torch.empty(1, 2, 2)
    network_input(counts, torch.tensor([4.0]), out=out)
    np.testing.assert_allclose(out.numpy(), [[[0.0, 2.0], [0.0, 1.0]]])


def test_remove_mask_mean_one_mask_and_per_patch_masks():
    rng = np.random.default_rng(1)
    phase = rng.normal(size=(3, 6, 6))
    mask = rng.random((6, 6)) > 0.4
    expected = np.where(mask, phase - phase[:, mask].mean(-1)[:, None, None], 0)
    np.testing.assert_allclose(remove_mask_mean(torch.from_numpy(phase), torch.from_numpy(mask)).numpy(), expected)
    masks = rng.random((3, 6, 6)) > 0.4
    expected = np.stack([np.where(m, p - p[m].mean(), 0) for p, m in zip(phase, masks)])
    result = remove_mask_mean(torch.from_numpy(phase), torch.from_numpy(masks))
    np.testing.assert_allclose(result.numpy(), expected)
    # broadcasting one mask per patch over several candidates, as probe recovery does: (T, M, N, N) with (T, 1, N, N)
    stacked = torch.from_numpy(np.stack([phase, phase]))
    result = remove_mask_mean(stacked, torch.from_numpy(np.stack([masks[0], masks[1]]))[:, None])
    np.testing.assert_allclose(result[1, 2].numpy(), np.where(masks[1], phase[2] - phase[2][masks[1]].mean(), 0))


def test_neighbour_sum_matches_a_loop_over_the_neighbourhood():
    rng = np.random.default_rng(2)
    counts = rng.poisson(5.0, size=(4, 5, 3, 3)).astype(np.float32)
    pooled, patterns = neighbour_sum(counts)
    for i in range(4):
        for j in range(5):
            block = counts[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            np.testing.assert_allclose(pooled[i, j], block.sum((0, 1)))
            assert patterns[i, j] == block.shape[0] * block.shape[1]
    assert patterns[1, 1] == 9 and patterns[0, 2] == 6 and patterns[0, 0] == 4
    with pytest.raises(ValueError, match="Rx, Ry"):
        neighbour_sum(counts[0])


def test_fourier_shift_by_whole_pixels_is_a_roll():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(8, 8)) + 1j * rng.normal(size=(8, 8))
    shifted = fourier_shift(torch.from_numpy(image).to(torch.complex64), torch.tensor([2.0, -3.0]))
    np.testing.assert_allclose(shifted.numpy(), np.roll(image, (2, -3), (0, 1)), atol=1e-5)


def test_pooled_illumination_is_the_sum_of_shifted_probe_intensities(geometry):
    probe = geometry.probe
    offsets = np.array([[0, 0], [1, 0], [0, -2], [3, 1]])
    expected = sum(np.abs(np.roll(probe, tuple(o), (0, 1))) ** 2 for o in offsets)
    result = pooled_illumination(torch.from_numpy(probe), torch.from_numpy(offsets).float()).numpy()
    np.testing.assert_allclose(result, expected / expected.max(), atol=1e-5)
    batched = pooled_illumination(torch.from_numpy(np.stack([probe, probe])), torch.from_numpy(np.stack([offsets] * 2)))
    np.testing.assert_allclose(batched.numpy(), np.stack([result, result]), atol=1e-6)
