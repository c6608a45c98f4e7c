import numpy as np
import pytest

from fedsim.data.synthetic_mri import CLASS_NAMES, GLIOMA, MENINGIOMA, NO_TUMOR, PITUITARY, apply_site_style, generate_cohort, render_image


def test_deterministic_balanced_and_shaped():
    a, la = generate_cohort(20, 32, seed=5)
    b, lb = generate_cohort(20, 32, seed=5)
    c, _ = generate_cohort(20, 32, seed=6)
    assert a.shape == (20, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert np.bincount(la).tolist() == [5, 5, 5, 5]
    assert CLASS_NAMES == ("glioma", "meningioma", "no_tumor", "pituitary")
    # an image depends on (seed, index) only, so a subset renders identically
    assert np.array_equal(render_image(5, 7, int(la[7]), 32), a[7])


def _mean_diff(label: int, region) -> float:
    """Mean absolute intensity difference (tumour class vs no-tumour, same seed/index: same head and
    acquisition) inside a region."""
    size = 96
    diffs = [render_image(0, i, label, size).astype(float) - render_image(0, i, NO_TUMOR, size).astype(float) for i in range(40)]
    d = np.mean(np.abs(diffs), axis=0)
    return float(d[region(size)].mean())


def test_anatomical_placement_of_tumours():
    lin = np.linspace(-1, 1, 96)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    sella = lambda s: (np.abs(xx) < 0.12) & (yy > 0.3) & (yy < 0.62)  # noqa: E731
    periphery = lambda s: (np.hypot(xx / 0.7, yy / 0.8) > 0.75) & (np.hypot(xx / 0.7, yy / 0.8) < 1.0)  # noqa: E731
    centre = lambda s: np.hypot(xx / 0.7, yy / 0.8) < 0.55  # noqa: E731
    # pituitary tumours brighten the sella much more than anything else does
    assert _mean_diff(PITUITARY, sella) > 3 * max(_mean_diff(MENINGIOMA, sella), _mean_diff(GLIOMA, sella), 1.0)
    # meningiomas sit at the periphery (extra-axial), gliomas deeper (intra-axial)
    assert _mean_diff(MENINGIOMA, periphery) > _mean_diff(MENINGIOMA, centre)
    assert _mean_diff(GLIOMA, centre) > _mean_diff(GLIOMA, periphery)


def test_site_styles_differ_and_are_deterministic():
    imgs, _ = generate_cohort(8, 32, seed=0)
    s0, s1 = apply_site_style(imgs, 0, seed=0), apply_site_style(imgs, 1, seed=0)
    assert s0.shape == imgs.shape and s0.dtype == np.uint8
    assert np.array_equal(s0, apply_site_style(imgs, 0, seed=0))
    assert not np.array_equal(s0, s1)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"label must be in 0\.\.3"):
        render_image(0, 0, 4, 32)
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        generate_cohort(4, 8, seed=0)
