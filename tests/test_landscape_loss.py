"""Loss over fixed batches: sample weighting, accuracy, dict batches, modes, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import make_gpt2_lora, make_linear_lora
from landscape import Loss


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_sample_weighted_mean_and_accuracy():
    model = make_linear_lora().eval()
    (x1, y1), (x2, y2) = _data(3, 0), _data(11, 1)
    loss = Loss([(x1, y1), (x2, y2)])
    assert loss.weights == [3, 11] and loss.total == 14
    x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
    with torch.no_grad():
        logits = model(x)
    result = loss.evaluate(model)
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    assert result["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert loss(model) == result["loss"]
    value = loss.value(model)
    assert value.requires_grad and float(value.detach()) == pytest.approx(result["loss"], rel=1e-6)
    assert float(loss.batch_value(model, (x1, y1)).detach()) == pytest.approx(float(F.cross_entropy(logits[:3], y1)), rel=1e-6)


def test_criterion_regression_has_no_accuracy():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    loss = Loss([(x, y)], criterion=F.mse_loss)
    result = loss.evaluate(model)
    assert result["accuracy"] is None
    assert result["loss"] == pytest.approx(float(F.mse_loss(model(x), y).detach()), rel=1e-6)


def test_dict_batches_use_the_models_own_loss():
    model = make_gpt2_lora()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 50, (n, 6), generator=g)} for n in (2, 3)]
    for b in batches:
        b["labels"] = b["input_ids"]
    loss = Loss(batches)
    assert loss.weights == [2, 3]
    model.eval()
    with torch.no_grad():
        own = [float(model(**b).loss) for b in batches]
    result = loss.evaluate(model)
    assert result["loss"] == pytest.approx((2 * own[0] + 3 * own[1]) / 5, rel=1e-6)
    assert result["accuracy"] is None  # token labels: no per-sample accuracy


def test_mode_is_set_and_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Dropout(0.5), nn.Linear(16, 4))
    model.train()
    model[2].eval()  # a mixed state must come back as it was
    x, y = _data(64, 2)
    eval_loss = Loss([(x, y)])
    train_loss = Loss([(x, y)], train_mode=True)
    with eval_loss.mode(model):
        assert not any(m.training for m in model.modules())
    with train_loss.mode(model):
        assert all(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert eval_loss(model) == eval_loss(model)  # eval mode: deterministic
    assert train_loss(model) != eval_loss(model)  # dropout is live in train mode
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_bad_batches():
    with pytest.raises(ValueError, match="at least one batch"):
        Loss([])
    with pytest.raises(ValueError, match="no samples"):
        Loss([(torch.zeros(0, 3), torch.zeros(0))])
    with pytest.raises(TypeError, match="dict or an"):
        Loss([torch.zeros(3)])
