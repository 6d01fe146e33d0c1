"""SSIM (Wang et al., 2004) for [0, 1] images: Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03."""

from __future__ import annotations

import torch


def gaussian_window(size: int = 11, sigma: float = 1.5, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps."""
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n - k + 1, n) matrix whose rows slide the taps g: a valid 1-D convolution as a matmul."""
    k = g.numel()
    rows = torch.zeros(n - k + 1, n, device=g.device, dtype=g.dtype)
    for i in range(n - k + 1):
        rows[i, i : i + k] = g
    return rows


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable valid Gaussian blur of (B, C, H, W) as two matmuls (faster than depthwise conv on CPU)."""
    return _band(x.shape[-2], g) @ x @ _band(x.shape[-1], g).T


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of each pair of (B, C, H, W) images (valid-region windows; smaller images shrink the window)."""
    window = min(window, a.shape[-1], a.shape[-2])
    g = gaussian_window(window, sigma, a.device)
    c1, c2 = 0.01**2, 0.03**2
    stats = _blur(torch.cat([a, b, a * a, b * b, a * b], dim=1), g)  # one grouped blur for all five maps
    mu_a, mu_b, e_aa, e_bb, e_ab = stats.chunk(5, dim=1)
    var_a, var_b, cov = e_aa - mu_a**2, e_bb - mu_b**2, e_ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)
