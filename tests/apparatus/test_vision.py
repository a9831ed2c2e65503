"""Digits data, the CNN, CE and KD training (checked against a hand-written step), save/load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from apparatus.classifiers import evaluate_classifier, predict_logits, train_classifier
from apparatus.digits import DigitsCNN, load_digits_cnn, load_digits_data, make_digits_cnn, save_digits_cnn


@pytest.fixture(scope="module")
def data():
    return load_digits_data(test_fraction=0.25, seed=0)


@pytest.fixture(scope="module")
def trained(data):
    model = make_digits_cnn(width=16, seed=0)
    train_classifier(model, data.train, epochs=10, lr=3e-3, seed=0)
    return model


def test_digits_split_is_scaled_stratified_and_seeded(data) -> None:
    assert data.x_train.shape == (1347, 1, 8, 8) and data.x_test.shape == (450, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    # sklearn's digits have 174-183 images per class; stratified: test counts are 25% +- 1
    for cls in range(10):
        n_test, n_train = int((data.y_test == cls).sum()), int((data.y_train == cls).sum())
        assert abs(n_test - 0.25 * (n_test + n_train)) <= 1
    again, other = load_digits_data(0.25, seed=0), load_digits_data(0.25, seed=1)
    assert torch.equal(again.x_test, data.x_test)
    assert not torch.equal(other.x_test, data.x_test)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_data(test_fraction=1.0)


def test_cnn_learns_digits_above_90_percent(data, trained) -> None:
    accuracy = evaluate_classifier(trained, *data.test)
    manual = (trained(data.x_test).argmax(-1) == data.y_test).double().mean().item()
    assert accuracy == pytest.approx(manual)
    assert accuracy > 0.9, accuracy


def test_feature_maps_shapes_and_bad_input(trained) -> None:
    x = torch.rand(5, 1, 8, 8)
    first, last = trained.feature_maps(x)
    assert first.shape == (5, 16, 8, 8) and last.shape == (5, 32, 4, 4)
    assert torch.equal(trained.features(x), last)
    with pytest.raises(ValueError, match=r"\[batch, 1, 8, 8\]"):
        trained(torch.rand(5, 64))
    with pytest.raises(ValueError, match="width"):
        DigitsCNN(width=0)


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b = make_digits_cnn(8, seed=4), make_digits_cnn(8, seed=4)
    assert torch.equal(torch.rand(3), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(make_digits_cnn(8, seed=5).head[-1].weight, a.head[-1].weight)


@pytest.mark.parametrize("scale_by_t2", [True, False])
def test_kd_step_matches_a_hand_written_hinton_step(data, trained, scale_by_t2) -> None:
    """One full-batch step of KD + CE equals the same step written directly with F.kl_div and Adam."""
    x, y = data.x_train[:32], data.y_train[:32]
    student = make_digits_cnn(8, seed=1)
    reference = copy.deepcopy(student)
    temperature, kd_weight, ce_weight, lr = 3.0, 0.7, 0.3, 1e-2
    history = train_classifier(
        student,
        (x, y),
        epochs=1,
        lr=lr,
        seed=0,
        batch_size=32,
        teacher=trained,
        kd_loss="forward_kl",
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
    )
    with torch.no_grad():
        teacher_logits = trained(x)
    optimizer = torch.optim.Adam(reference.parameters(), lr=lr)
    logits = reference(x)
    kl = F.kl_div(
        F.log_softmax(logits / temperature, -1),
        F.log_softmax(teacher_logits / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    loss = kd_weight * kl * (temperature**2 if scale_by_t2 else 1.0) + ce_weight * F.cross_entropy(logits, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert history.epoch_losses[0] == pytest.approx(loss.item(), rel=1e-5)
    for p, q in zip(student.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_ce_temperature_divides_the_logits(data) -> None:
    x, y = data.x_train[:16], data.y_train[:16]
    model = make_digits_cnn(8, seed=2)
    with torch.no_grad():
        expected = F.cross_entropy(model(x) / 20.0, y).item()
    history = train_classifier(model, (x, y), epochs=1, lr=1e-3, seed=0, batch_size=16, ce_temperature=20.0)
    assert history.epoch_losses[0] == pytest.approx(expected, rel=1e-5)


def test_student_distilled_without_labels_learns_the_task(data, trained) -> None:
    student = make_digits_cnn(8, seed=3)
    train_classifier(
        student, (data.x_train, None), epochs=6, lr=3e-3, seed=0, teacher=trained, temperature=4.0
    )
    assert evaluate_classifier(student, *data.test) > 0.85


def test_training_rejects_inconsistent_arguments(data, trained) -> None:
    model = make_digits_cnn(8, seed=0)
    with pytest.raises(ValueError, match="without a teacher"):
        train_classifier(model, data.train, 1, 1e-3, 0, kd_loss="forward_kl")
    with pytest.raises(ValueError, match="labels are None"):
        train_classifier(model, (data.x_train, None), 1, 1e-3, 0)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(model, data.train, 0, 1e-3, 0)
    with pytest.raises(ValueError, match="one label per input"):
        train_classifier(model, (data.x_train, data.y_train[:5]), 1, 1e-3, 0)
    with pytest.raises(ValueError, match="not a stateless teacher-logit objective"):
        train_classifier(model, data.train, 1, 1e-3, 0, teacher=trained, kd_loss="ce")
    with pytest.raises(KeyError, match="unknown loss"):
        train_classifier(model, data.train, 1, 1e-3, 0, teacher=trained, kd_loss="nope")


def test_save_and_load_round_trip(tmp_path, data, trained) -> None:
    save_digits_cnn(trained, tmp_path / "cnn")
    loaded = load_digits_cnn(tmp_path / "cnn")
    assert loaded.width == 16
    assert torch.equal(predict_logits(loaded, data.x_test), predict_logits(trained, data.x_test))
    with pytest.raises(FileNotFoundError, match="save_digits_cnn"):
        load_digits_cnn(tmp_path / "missing")
