"""The private-Ray adapter refuses a Ray it was not written for (imports Ray, starts nothing)."""

from __future__ import annotations

import pytest
import ray

from mlplatform import ray_compat


def test_the_installed_ray_is_the_supported_one() -> None:
    ray_compat.check_ray_version(ray.__version__)  # what importing the adapter ran
    ray_compat.check_ray_version(f"{ray_compat.SUPPORTED_RAY}.9")  # any patch release


@pytest.mark.parametrize("version", ["2.61.0", "2.6.0", "3.60.0", "2.600.1"])
def test_another_ray_minor_fails_naming_both_versions(version: str) -> None:
    with pytest.raises(RuntimeError, match=rf"written for Ray {ray_compat.SUPPORTED_RAY}\.x, but Ray {version}"):
        ray_compat.check_ray_version(version)
