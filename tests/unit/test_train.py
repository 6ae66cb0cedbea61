"""The training loop: loss falls, runs are reproducible, and an interrupted run resumes."""
import torch

from adtr_edge.model.config import ReconstructorConfig, TrainConfig
from adtr_edge.model.reconstructor import Reconstructor
from adtr_edge.model.train import fit, seed_everything


def _setup(seed=0):
    seed_everything(seed)
    feats = torch.randn(24, 8, 4, 4)
    model = Reconstructor(8, 4, ReconstructorConfig(hidden_dim=16, num_heads=2, ffn_dim=32, neighbor_mask=0))
    model.fit_normalization(feats)
    return model, feats


def _tcfg(**kw):
    return TrainConfig(batch_size=8, warmup_steps=2, lr=3e-3, **kw)


def test_same_seed_same_result():
    a, feats = _setup()
    ra = fit(a, (feats,), (feats[:4],), _tcfg(epochs=2), progress=False)
    b, feats = _setup()
    rb = fit(b, (feats,), (feats[:4],), _tcfg(epochs=2), progress=False)
    assert [h["train_loss"] for h in ra.history] == [h["train_loss"] for h in rb.history]


def test_interrupted_training_resumes_from_its_last_epoch(tmp_path):
    state = tmp_path / "train_state.pt"
    straight, feats = _setup()
    full = fit(straight, (feats,), None, _tcfg(epochs=4), progress=False)

    first, feats = _setup()
    fit(first, (feats,), None, _tcfg(epochs=4, max_minutes=1e-9), state_path=state, state_tag="t", progress=False)
    # The time budget stopped it after epoch 1; a new process picks it up from the state file.
    second, _ = _setup(seed=123)
    resumed = fit(second, (feats,), None, _tcfg(epochs=4), state_path=state, state_tag="t", progress=False)
    assert len(resumed.history) == 4
    assert [round(h["train_loss"], 6) for h in resumed.history] == [round(h["train_loss"], 6) for h in full.history]
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, second.state_dict()[key], atol=1e-6), key


def test_state_from_other_settings_is_ignored(tmp_path):
    state = tmp_path / "train_state.pt"
    model, feats = _setup()
    fit(model, (feats,), None, _tcfg(epochs=1), state_path=state, state_tag="a", progress=False)
    other, _ = _setup()
    result = fit(other, (feats,), None, _tcfg(epochs=2), state_path=state, state_tag="b", progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_the_configured_loss_is_the_one_trained_on():
    """train.loss=hard_mining trains on each image's worst cells: its reported loss is that loss (above
    the plain MSE of the same model), and it is deterministic like the default."""
    from adtr_edge.model.reconstructor import hard_mining_loss, reconstruction_loss

    model, feats = _setup()
    result = fit(model, (feats,), (feats[:8],), _tcfg(epochs=2, loss="hard_mining", hard_fraction=0.25),
                 progress=False)
    with torch.no_grad():
        target, recon = model(feats[:8])
    assert abs(result.history[-1]["val_loss"] - hard_mining_loss(target, recon, 0.25).item()) < 1e-5
    assert result.history[-1]["val_loss"] > reconstruction_loss(target, recon).item()
    again, _ = _setup()
    repeat = fit(again, (feats,), (feats[:8],), _tcfg(epochs=2, loss="hard_mining", hard_fraction=0.25),
                 progress=False)
    assert [h["train_loss"] for h in repeat.history] == [h["train_loss"] for h in result.history]


def test_a_bad_loss_setting_is_refused_with_its_name():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="loss"):
        TrainConfig(loss="l1")
    with pytest.raises(ValidationError, match="hard_fraction"):
        TrainConfig(hard_fraction=0)
