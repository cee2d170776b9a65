"""Checkpoint files: a digest of the contents catches flipped bytes, the previous checkpoint is
kept, and resuming falls back to it with a message when the latest is corrupt or missing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unireg.training.checkpoint import (
    CheckpointError,
    content_digest,
    previous_path,
    read_checkpoint,
    read_latest_checkpoint,
    save_checkpoint,
)


class Tiny(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.config = {"width": width}
        self.lin = nn.Linear(width, width)


def _save(path, seed: int, step: int, **kw):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters())
    return save_checkpoint(path, "toy", model, optimizer=opt, step=step, **kw), model


def _flip(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_in_the_weights_is_caught_by_the_digest(tmp_path):
    path, model = _save(tmp_path / "last.pt", seed=0, step=3)
    good = read_checkpoint(path)
    assert good.step == 3 and torch.equal(good.state_dict["lin.weight"], model.lin.weight)
    raw = path.read_bytes()
    weights = model.lin.weight.detach().numpy().tobytes()
    at = raw.find(weights)
    assert at > 0  # stored uncompressed inside the zip
    _flip(path, at + 5)
    with pytest.raises(CheckpointError, match="last.pt: corrupt checkpoint"):
        read_checkpoint(path)


def test_any_flipped_byte_is_refused_or_harmless(tmp_path):
    path, _ = _save(tmp_path / "c.pt", seed=1, step=1)
    raw = path.read_bytes()
    reference = content_digest(read_checkpoint(path).payload())
    outcomes = {"refused": 0, "harmless": 0}
    for offset in range(0, len(raw), max(1, len(raw) // 97)):
        path.write_bytes(raw)
        _flip(path, offset)
        try:
            loaded = read_checkpoint(path)
        except CheckpointError:
            outcomes["refused"] += 1
            continue
        # zip padding or metadata torch does not read: the contents must be the same
        assert content_digest(loaded.payload()) == reference, offset
        outcomes["harmless"] += 1
    assert outcomes["refused"] > 0


def test_resume_falls_back_to_the_previous_checkpoint_with_a_message(tmp_path, capsys):
    last = tmp_path / "last.pt"
    _save(last, seed=0, step=100, keep_previous=True)
    _, model = _save(last, seed=1, step=200, keep_previous=True)
    assert read_checkpoint(previous_path(last)).step == 100
    assert read_latest_checkpoint(last).step == 200
    _flip(last, last.read_bytes().find(model.lin.bias.detach().numpy().tobytes()) + 1)
    chosen = read_latest_checkpoint(last)
    err = capsys.readouterr().err
    assert chosen.step == 100 and "last.pt" in err and "resuming from" in err
    assert "last.prev.pt (step 100)" in err
    # killed between moving last.pt aside and putting the new one in place
    last.unlink()
    assert read_latest_checkpoint(last).step == 100
    # both unusable: a named error, not a silent fresh start
    last.write_bytes(b"garbage")
    previous_path(last).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        read_latest_checkpoint(last)
    assert read_latest_checkpoint(tmp_path / "none.pt") is None


def test_files_without_a_digest_still_read(tmp_path):
    path, _ = _save(tmp_path / "old.pt", seed=2, step=7)
    payload = torch.load(path, weights_only=True)
    del payload["sha256"]
    torch.save(payload, path)
    assert read_checkpoint(path).step == 7
