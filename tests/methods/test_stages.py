"""The linear stage the learned methods run first: a ``keymorph`` stage reads the images'
brains only when the method's ``brain`` option lets it."""

from __future__ import annotations

import pytest
import torch
from conftest import demo_brains

from unireg.methods.registry import create, model_path
from unireg.spatial.transform import AffineTransform


class _Stop(Exception):
    """Ends a registration once its linear stage has been asked for."""


@pytest.mark.parametrize("brain", ["auto", "off"])
def test_the_keymorph_stage_passes_the_brain_mode_to_keymorph(monkeypatch, brain):
    import unireg.methods.keymorph.inference as km
    import unireg.methods.stages as stages
    from unireg.methods.keymorph import KeyMorph
    from unireg.nets.keypoints import KeypointDetector

    seen: list[str] = []

    class Result:
        transform = AffineTransform.identity(3)

    def fake(fixed, moving, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append(kwargs["brain"])
        return Result()

    tiny = KeyMorph(KeypointDetector(3, num_keypoints=4, channels=(4,)), 40.0)
    monkeypatch.setattr(stages, "_shipped_keymorph", lambda device: (tiny, None))
    monkeypatch.setattr(km, "register_keymorph", fake)
    fixed, moving, _, _ = demo_brains()
    out = stages.affine_stage(fixed, moving, "keymorph", "fast", torch.device("cpu"), brain=brain)
    assert seen == [brain] and isinstance(out, AffineTransform)


@pytest.mark.parametrize("method", ["sitreg", "dio", "avsm"])
@pytest.mark.parametrize("brain", ["auto", "off"])
def test_each_learned_method_hands_its_brain_option_to_its_linear_stage(monkeypatch, method, brain):
    if not model_path(method).exists():
        pytest.skip(f"no shipped {method} model")
    import importlib

    module = importlib.import_module(f"unireg.methods.{method}.inference")
    seen: list[tuple[str, str]] = []

    def stage(fixed, moving, affine, preset, device, *args, brain="auto"):  # noqa: ANN001, ANN202
        seen.append((affine, brain))
        raise _Stop

    monkeypatch.setattr(module, "affine_stage", stage)
    fixed, moving, _, _ = demo_brains()
    registration = create(f"{method}:affine=keymorph:brain={brain}")
    # brain=auto wraps the method in the extraction matcher; the stage sees the mode either way
    with pytest.raises(_Stop):
        registration.register(fixed, moving)
    assert seen == [("keymorph", brain)]
