"""The dense autoencoder and its losses against dense reference formulas."""

import numpy as np
import pytest
import torch

from scgnn_scale.nn.autoencoder import DenseAutoencoder
from scgnn_scale.nn.losses import (
    ORIGINAL_BATCH_CELLS,
    add_l1_gradient,
    l1_penalty,
    reconstruction_loss,
    reference_cells,
)


def test_autoencoder_shapes_and_relu():
    torch.manual_seed(0)
    model = DenseAutoencoder(50, hidden=32, latent=8)
    x = torch.rand(7, 50)
    recon, z = model(x)
    assert recon.shape == (7, 50) and z.shape == (7, 8)
    assert torch.equal(model.encode(x), z)
    assert torch.equal(model.decode(z), recon)
    assert (recon >= 0).all() and (z >= 0).all()  # ReLU on every layer, as the published AE
    default = DenseAutoencoder(20)
    assert default.fc1.out_features == 512 and default.fc2.out_features == 128
    assert default.fc3.out_features == 512 and default.fc4.out_features == 20
    with pytest.raises(ValueError):
        DenseAutoencoder(0)


def _dense_loss(x, r, trs, w, gamma, alpha, ref):
    sq = (x - r) ** 2
    weight = gamma + (alpha * trs if trs is not None else 0.0) + (w[:, None] if w is not None else 0.0)
    return ref / x.shape[0] * (weight * sq).sum()


def test_loss_equals_dense_formula(rng):
    x = rng.random((11, 9))
    r = rng.random((11, 9))
    trs = rng.integers(0, 4, (11, 9)).astype(np.uint8)
    w = rng.random(11) * 5
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    for trs_, w_ in [(None, None), (trs, None), (None, w), (trs, w)]:
        got = reconstruction_loss(t(x), t(r), trs=None if trs_ is None else torch.from_numpy(trs_), gamma=0.1,
                                  alpha=0.9, cell_weight=None if w_ is None else t(w_), reference_cells=300)
        ref = _dense_loss(x, r, trs_, w_, 0.1, 0.9, 300)
        assert float(got) == pytest.approx(ref, rel=1e-5)
    # a full batch with reference_cells = N is the published sum: gamma*sum(E) + alpha*sum(TRS o E)
    sq = (x - r) ** 2
    original = 0.1 * sq.sum() + 0.9 * (trs * sq).sum()
    got = reconstruction_loss(t(x), t(r), trs=torch.from_numpy(trs), gamma=0.1, alpha=0.9,
                              reference_cells=reference_cells(11))
    assert float(got) == pytest.approx(original, rel=1e-5)


def test_loss_scale_does_not_change_with_batch_size(rng):
    n, g = 4096, 20
    x = torch.from_numpy(rng.random((n, g), dtype=np.float32))
    r = torch.from_numpy(rng.random((n, g), dtype=np.float32))
    trs = torch.from_numpy(rng.integers(0, 3, (n, g)).astype(np.uint8))
    full = float(reconstruction_loss(x, r, trs=trs, gamma=0.1, alpha=0.9, reference_cells=1000))
    means = []
    for b in (32, 256, 1024, 4096):
        per_batch = [float(reconstruction_loss(x[s:s + b], r[s:s + b], trs=trs[s:s + b], gamma=0.1, alpha=0.9,
                                               reference_cells=1000)) for s in range(0, n, b)]
        means.append(np.mean(per_batch))
        # each single batch is an unbiased estimate of the same magnitude (not b-times larger)
        assert 0.5 * full < per_batch[0] < 2.0 * full
    np.testing.assert_allclose(means, full, rtol=1e-4)
    # the sum reduction of the original would grow 128-fold from b=32 to b=4096
    plain_sum = [float(reconstruction_loss(x[:b], r[:b], trs=trs[:b], gamma=0.1, alpha=0.9, reference_cells=b))
                 for b in (32, 4096)]
    assert plain_sum[1] / plain_sum[0] > 50


def test_reference_cells_caps_at_the_original_batch():
    assert reference_cells(3000) == 3000
    assert reference_cells(ORIGINAL_BATCH_CELLS) == ORIGINAL_BATCH_CELLS
    assert reference_cells(1_000_000) == ORIGINAL_BATCH_CELLS


def test_l1_penalty_is_sum_of_absolute_parameters():
    torch.manual_seed(1)
    model = DenseAutoencoder(30, hidden=16, latent=4)
    dense = sum(np.abs(p.detach().numpy()).sum() for p in model.parameters())
    assert float(l1_penalty(model).detach()) == pytest.approx(dense, rel=1e-5)
    l1_penalty(model).backward()
    assert torch.equal(model.fc1.weight.grad, torch.sign(model.fc1.weight.detach()))


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_l1_gradient_added_directly_equals_backpropagating_the_penalty(rng, weight):
    """The trainers add the L1 term's gradient after backward(): bit for bit what autograd gives."""
    x = torch.from_numpy(rng.random((40, 30)).astype(np.float32))
    grads, losses = [], []
    for way in ("autograd", "direct", "without"):
        torch.manual_seed(3)
        model = DenseAutoencoder(30, hidden=16, latent=4)
        with torch.no_grad():
            model.fc2.bias[0] = 0.0  # sign 0: no L1 gradient there
        rec = reconstruction_loss(x, model(x)[0], gamma=1.0, alpha=0.0, reference_cells=40)
        if way == "autograd":
            loss = rec + weight * l1_penalty(model)
            loss.backward()
        else:
            rec.backward()
            loss = rec.detach() + weight * add_l1_gradient(model, weight) if way == "direct" else rec.detach()
        grads.append([p.grad.clone() for p in model.parameters()])
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))
    assert not torch.equal(grads[0][0], grads[2][0])  # the term is there


def _train_side_by_side(pairs, steps: int, x: torch.Tensor) -> None:
    for _ in range(steps):
        for model, opt in pairs:
            opt.zero_grad()
            ((model(x)[0] - x) ** 2).sum().backward()
            opt.step()


@pytest.mark.parametrize("foreach", [True, False])
def test_adam_takes_torchs_adam_steps_bit_for_bit(foreach):
    """Our Adam takes the same values as torch's for-each and per-tensor Adam, not the fused kernel's."""
    from scgnn_scale.nn.optim import adam

    torch.manual_seed(0)
    ours_model, plain_model = DenseAutoencoder(30, 16, 4), DenseAutoencoder(30, 16, 4)
    plain_model.load_state_dict(ours_model.state_dict())
    start = [p.detach().clone() for p in ours_model.parameters()]
    ours = adam(ours_model.parameters(), lr=1e-2)
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-2, foreach=foreach)
    x = torch.rand(8, 30)
    _train_side_by_side(((ours_model, ours), (plain_model, plain)), 20, x)
    for a, b, before in zip(ours_model.parameters(), plain_model.parameters(), start, strict=True):
        assert not torch.equal(a, before)
        assert torch.equal(a, b)
    # a parameter without a gradient is left alone by both, and so is its state
    for model in (ours_model, plain_model):
        model.fc1.bias.requires_grad_(False)
        model.fc1.bias.grad = None
    frozen = ours_model.fc1.bias.detach().clone()
    _train_side_by_side(((ours_model, ours), (plain_model, plain)), 5, x)
    assert torch.equal(ours_model.fc1.bias, frozen)
    for a, b in zip(ours_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adam_resumes_from_its_own_and_torchs_state():
    """A checkpoint of ours or of torch's Adam resumes in ours with the same steps (torch's state layout)."""
    from scgnn_scale.nn.optim import adam

    torch.manual_seed(1)
    x = torch.rand(8, 30)
    reference = DenseAutoencoder(30, 16, 4)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=True)
    _train_side_by_side(((reference, opt),), 12, x)

    for first in (adam, lambda p, lr: torch.optim.Adam(p, lr=lr, foreach=True)):
        model = DenseAutoencoder(30, 16, 4)
        model.load_state_dict(start)
        opt_a = first(model.parameters(), lr=1e-2)
        _train_side_by_side(((model, opt_a),), 7, x)
        saved = torch.load(_round_trip(opt_a.state_dict()), weights_only=True)  # as a checkpoint holds it
        opt_b = adam(model.parameters(), lr=1.0)  # the learning rate comes from the state
        opt_b.load_state_dict(saved)
        assert opt_b.param_groups[0]["lr"] == 1e-2
        _train_side_by_side(((model, opt_b),), 5, x)
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(a, b)


def _round_trip(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_adam_refuses_a_state_of_another_model():
    from scgnn_scale.nn.optim import adam

    small, large = DenseAutoencoder(30, 16, 4), torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="parameters"):
        adam(large.parameters(), lr=1e-3).load_state_dict(adam(small.parameters(), lr=1e-3).state_dict())
