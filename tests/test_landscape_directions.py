"""Directions and samplers: filter normalization, Flat-LoRA noise, seeds, Gram–Schmidt, gradient,
trajectory PCA; the guard; and the README's sharpness-probe code, run as written."""
import copy
import functools
import re
from pathlib import Path

import pytest
import torch

from helpers import make_conv_lora, make_linear_lora
from flatlora import filter_noise_std
from landscape import Loss, ModelChangedError, SpaceError, preserved, snapshot, space
from landscape import directions as D
from landscape.evaluate import value_and_grad


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_filter_normalization_matches_row_norms():
    model = make_conv_lora()
    for kind in ("merged", "all", "lora"):
        sp = space(model, kind)
        theta, d = sp.point(), D.filter_normalized(sp, _gen())
        for n in sp.names:
            if d[n].dim() == 1:
                assert torch.count_nonzero(d[n]) == 0  # 1-D tensors zeroed by default
            else:  # conv kernels: one row per output channel
                torch.testing.assert_close(d[n].flatten(1).norm(dim=1), theta[n].flatten(1).norm(dim=1))
    sp = space(model, "all")
    kept = functools.partial(D.filter_normalized, one_d="filter")(sp, _gen())
    bias = [n for n in sp.names if sp.shapes[n].numel() == sp.shapes[n][0] and len(sp.shapes[n]) == 1][0]
    torch.testing.assert_close(kept[bias].norm(), sp.point()[bias].norm())
    with pytest.raises(ValueError, match="1-D policy"):
        D.filter_normalized(sp, _gen(), one_d="keep")


def test_filter_normalization_in_tangent_stays_in_the_space():
    model = make_linear_lora()
    sp = space(model, "tangent")
    d, theta = D.filter_normalized(sp, _gen()), sp.point()
    for n in sp.names:
        torch.testing.assert_close(sp.project(d)[n], d[n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(d[n].norm(), theta[n].norm())


def test_flat_lora_noise_is_filter_noise_std_times_the_generators_draws():
    model = make_linear_lora()
    sp = space(model, "merged")
    eps, theta, g = D.flat_lora_noise(sp, _gen(3), sigma=0.05), sp.point(), _gen(3)
    for n in sp.names:
        z = torch.randn(theta[n].shape, generator=g)
        torch.testing.assert_close(eps[n], z * filter_noise_std(theta[n], 0.05)[:, None])


def test_samplers_are_seeded_and_leave_the_global_rng_alone():
    model = make_linear_lora()
    sp = space(model, "lora")
    state = torch.get_rng_state()
    for sampler in (D.gaussian, D.rademacher, D.filter_normalized, D.flat_lora_noise, D.adaptive_noise):
        a, b, c = sampler(sp, _gen(1)), sampler(sp, _gen(1)), sampler(sp, _gen(2))
        assert all(torch.equal(a[n], b[n]) for n in sp.names)
        assert not all(torch.equal(a[n], c[n]) for n in sp.names)
    assert torch.equal(state, torch.get_rng_state())
    r = D.rademacher(sp, _gen())
    assert all(set(r[n].unique().tolist()) == {-1.0, 1.0} for n in sp.names)


def test_orthogonalize():
    sp = space(make_linear_lora(), "merged")
    d1, d2 = D.filter_normalized(sp, _gen(1)), D.filter_normalized(sp, _gen(2))
    o = D.orthogonalize(sp, d1, d2)
    assert abs(float(sp.inner(o, d1))) < 1e-5 * float(sp.norm(d1) * sp.norm(o))
    torch.testing.assert_close(sp.norm(o), sp.norm(d2))
    with pytest.raises(ValueError, match="parallel"):
        D.orthogonalize(sp, d1, {n: 2 * t for n, t in d1.items()})


def test_gradient_sampler_is_the_normalized_gradient():
    model = make_linear_lora()
    g = _gen(4)
    loss = Loss([(torch.randn(20, 12, generator=g), torch.randint(0, 4, (20,), generator=g))])
    sp = space(model, "lora")
    d = D.gradient(loss)(sp, _gen())
    model.zero_grad()
    loss.value(model).backward()
    params = dict(model.named_parameters())
    grad = {n: params[n].grad for n in sp.names}
    for n in sp.names:
        torch.testing.assert_close(d[n], grad[n] / sp.norm(grad), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(value_and_grad(sp, loss, sp.zeros())[1][sp.names[0]], grad[sp.names[0]])


def test_trajectory_pca_recovers_the_plane_of_the_trajectory():
    model = make_linear_lora()
    sp = space(model, "lora")
    u, v = D.gaussian(sp, _gen(1)), D.gaussian(sp, _gen(2))
    v = D.orthogonalize(sp, u, v)
    u = {n: t / sp.norm(u) for n, t in u.items()}
    v = {n: t / sp.norm(v) for n, t in v.items()}
    theta = sp.point()
    coeffs = [(3.0, 0.1), (2.0, -0.4), (1.0, 0.3), (0.5, -0.2)]
    checkpoints = [{n: theta[n] + a * u[n] + b * v[n] for n in sp.names} for a, b in coeffs]
    pca = D.trajectory_pca(sp, checkpoints, k=2)
    basis = torch.stack([sp.to_vector(u), sp.to_vector(v)]).double()
    for d in pca.directions:  # each principal direction lies in span{u, v}, unit norm
        x = sp.to_vector(d).double()
        assert float((basis @ x).norm()) == pytest.approx(1.0, abs=1e-5)
    assert pca.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-6)
    assert pca.explained_variance_ratio[0] > pca.explained_variance_ratio[1]
    # projected coordinates reproduce the checkpoints' offsets
    rebuilt = pca.coordinates["alpha"].to_numpy()[:, None] * sp.to_vector(pca.directions[0]).double().numpy() \
        + pca.coordinates["beta"].to_numpy()[:, None] * sp.to_vector(pca.directions[1]).double().numpy()
    offsets = torch.stack([sp.to_vector({n: c[n] - theta[n] for n in sp.names}) for c in checkpoints]).double().numpy()
    assert abs(rebuilt - offsets).max() < 1e-4


def test_checkpoints_from_state_dicts_files_and_adapter_folders(tmp_path):
    model = make_linear_lora()
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=_gen(9)))
    state = {n: p.detach() for n, p in trained.named_parameters() if "lora_" in n}
    torch.save(state, tmp_path / "state.pt")
    trained.save_pretrained(tmp_path / "adapter")
    for kind in ("merged", "lora"):
        sp = space(model, kind)
        expected = space(trained, kind).point()
        for checkpoint in (trained, state, tmp_path / "state.pt", tmp_path / "adapter"):
            got = D.checkpoint_point(sp, checkpoint)
            assert all(torch.allclose(got[n], expected[n]) for n in sp.names), (kind, checkpoint)
    assert not torch.equal(sp.point()[sp.names[0]], expected[sp.names[0]])  # the model is untouched
    with pytest.raises(SpaceError, match="not a parameter or buffer"):
        D.checkpoint_point(sp, {"nope": torch.zeros(1)})


def test_guard_restores_and_reports():
    model = make_linear_lora()
    first = next(model.parameters())
    before = {n: t.clone() for n, t in model.state_dict().items()}
    flag, training, rng = first.requires_grad, model.training, torch.get_rng_state()
    with pytest.raises(ModelChangedError, match="written in place"):
        with preserved(model, copy_parameters=True) as snap:
            model.train(not training)
            torch.randn(3)
            first.requires_grad_(not flag)
            with torch.no_grad():
                first.add_(1.0)
            assert len(snap.changes(model)) >= 4  # parameter, flag, modes, RNG
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert first.requires_grad == flag and model.training == training and torch.equal(rng, torch.get_rng_state())
    assert snapshot(model).changes(model) == []


def _readme_blocks():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Sharpness probes", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_sharpness_probes_run(tmp_path, monkeypatch, digits_task, digits_flat_lora_run):
    """The README's probe tour and custom sampler, exactly as written (the first block — training a
    digits-mlp adapter — is replaced by a short run: a copy of conftest's shared Flat-LoRA run, 30
    steps; the rest is executed verbatim)."""
    import copy

    setup, tour, sampler = _readme_blocks()
    assert "run(TrainConfig(task=\"digits-mlp\"" in setup
    monkeypatch.chdir(tmp_path)
    task = digits_task
    model = copy.deepcopy(digits_flat_lora_run[0])
    namespace = {"model": model, "task": task, "loss": Loss(task.batches("test", 100))}
    exec(setup.split("task = ")[0], namespace)  # the imports of the first block
    exec(tour, namespace)
    exec(sampler, namespace)
    assert (tmp_path / "figures" / "digits_lines.png").exists() and (tmp_path / "runs" / "digits_plane.json").exists()
    sparse = namespace["sparse"]
    assert sorted(sparse["direction"].unique()) == [0, 1, 2] and sparse["loss"].notna().all()
