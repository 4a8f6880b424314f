"""Perfusion's gated rank-one edit (Tewel et al. 2023, eq. 3; BRIEF.md) on random tensors."""
import pytest
import torch
from torch import nn

from pixart.personalize.edit import EditedProjection, GateSettings, c_inv_basis

D, OUT = 8, 6


def edit_reference(e, weight, c_inv, i_star, o_star, beta, tau):
    """The paper's single-concept formula exactly as written (eq. 3): W(e - sim i*) + sigmoid((sim - beta)/tau) o*,
    with sim = e^T C^-1 i* / (i*^T C^-1 i*)."""
    energy = i_star @ c_inv @ i_star
    sim = (e @ c_inv @ i_star) / energy
    return (e - sim[..., None] * i_star) @ weight.T + torch.sigmoid((sim - beta) / tau)[..., None] * o_star


def _setup(k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    c_inv = torch.linalg.inv(a @ a.T / D + 0.1 * torch.eye(D, dtype=torch.float64))
    linear = nn.Linear(D, OUT, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(OUT, D, generator=g, dtype=torch.float64))
    i_stars = torch.randn(k, D, generator=g, dtype=torch.float64)
    targets = torch.randn(k, OUT, generator=g, dtype=torch.float64)
    return linear, c_inv, i_stars, targets


def _edit(linear, c_inv, i_stars, targets, beta=0.75, tau=0.1):
    gates = [GateSettings(beta, tau) for _ in range(len(i_stars))]
    return EditedProjection(linear, c_inv, i_stars, lambda w: targets, gates, dtype=torch.float64)


def _c_orthogonal(v, i_stars, c_inv, seed=1):
    """A random vector projected C^-1-orthogonally off `i_stars`."""
    e = torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    basis = c_inv_basis(i_stars, c_inv)
    return e - (basis @ c_inv @ e) @ basis


def test_concept_encoding_with_the_gate_open_gives_its_target():
    linear, c_inv, i_stars, targets = _setup()
    edit = _edit(linear, c_inv, i_stars, targets, beta=0.5, tau=0.01)  # sigmoid(50): the gate is open
    out = edit(i_stars[None])[0, 0]
    torch.testing.assert_close(out, targets[0], rtol=0, atol=1e-9)


def test_c_inverse_orthogonal_encoding_keeps_the_frozen_projection():
    linear, c_inv, i_stars, targets = _setup()
    e = _c_orthogonal(None, i_stars, c_inv)
    assert abs(float(e @ c_inv @ i_stars[0])) < 1e-9
    edit = _edit(linear, c_inv, i_stars, targets, tau=0.01)
    caption = torch.stack([e, i_stars[0]])[None]  # a caption that names the concept, so the edit is on
    torch.testing.assert_close(edit(caption)[0, 0], linear(e), rtol=0, atol=1e-9)


def test_matches_the_formula_as_written():
    linear, c_inv, i_stars, targets = _setup()
    e = torch.randn(3, 5, D, dtype=torch.float64)
    e[:, 2] = i_stars[0] * 1.1  # every caption names the concept
    edit = _edit(linear, c_inv, i_stars, targets)
    want = edit_reference(e, linear.weight, c_inv, i_stars[0], targets[0], 0.75, 0.1)
    torch.testing.assert_close(edit(e), want, rtol=1e-9, atol=1e-9)


def test_a_caption_without_the_concept_is_the_base_projection_exactly():
    linear, c_inv, i_stars, targets = _setup()
    e = torch.randn(2, 5, D, dtype=torch.float64) * 0.01  # no token anywhere near i*
    e[1, 3] = i_stars[0]
    out = _edit(linear, c_inv, i_stars, targets)(e)
    assert torch.equal(out[0], linear(e[0]))
    assert not torch.allclose(out[1], linear(e[1]))


def test_two_concepts_are_orthogonalised_in_the_c_inverse_metric():
    linear, c_inv, i_stars, targets = _setup(k=2)
    basis = c_inv_basis(i_stars, c_inv)
    torch.testing.assert_close(basis @ c_inv @ basis.T, torch.eye(2, dtype=torch.float64))
    edit = _edit(linear, c_inv, i_stars, targets, beta=0.5, tau=0.01)
    # e C^-1-orthogonal to both: W e, untouched
    e = _c_orthogonal(None, i_stars, c_inv)
    out = edit(torch.stack([e, i_stars[0]])[None])[0, 0]
    torch.testing.assert_close(out, linear(e), rtol=0, atol=1e-9)
    # e in their span: nothing of W e is kept, only the gated targets
    mix = 0.3 * i_stars[0] + 0.7 * i_stars[1]
    sims = [float(mix @ c_inv @ i / (i @ c_inv @ i)) for i in i_stars]
    want = sum(torch.sigmoid(torch.tensor((s - 0.5) / 0.01, dtype=torch.float64)) * t
               for s, t in zip(sims, targets, strict=True))
    torch.testing.assert_close(edit(mix[None, None])[0, 0], want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_sim_does_not_depend_on_the_scale_of_c(scale):
    linear, c_inv, i_stars, targets = _setup()
    e = torch.randn(1, 4, D, dtype=torch.float64)
    e[0, 0] = i_stars[0]
    a = _edit(linear, c_inv, i_stars, targets)(e)
    b = _edit(linear, c_inv / scale, i_stars, targets)(e)
    torch.testing.assert_close(a, b)
