"""Perturbation: each perturbation changes exactly the chosen weights, in the right way, is
seeded, and the model comes back bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny import build_tiny_model
from critical_weights.config.params import ValidateParams
from critical_weights.core.errors import ModelError, ParamsError
from critical_weights.validation.perturbation import RestoreError, bit_index, digest, flip_bit, perturbed

# float32 values whose every bit pattern class is covered: zero, -0, normal, tiny, huge, subnormal, inf, nan
SPECIAL = [0.0, -0.0, 1.5, -3.25e-3, 0.5, 7e30, -1e-40, float("inf"), float("nan")]


def uint_bits(t: torch.Tensor) -> np.ndarray:
    """The stored bits of a float32 or bfloat16 tensor as unsigned integers."""
    if t.dtype == torch.float32:
        return t.view(torch.int32).numpy().view(np.uint32)
    return t.view(torch.int16).numpy().view(np.uint16)


# ----------------------------------------------------------------------------- bit flips


@pytest.mark.parametrize("dtype, width", [(torch.float32, 32), (torch.bfloat16, 16)])
def test_bit_flip_xors_exactly_one_bit_for_every_bit_index(dtype, width):
    values = torch.tensor(SPECIAL, dtype=torch.float32).to(dtype)
    before = uint_bits(values).copy()
    for bit in range(width):
        out = flip_bit(values, bit)
        assert out.dtype == dtype
        diff = uint_bits(out) ^ before
        assert (diff == (1 << bit)).all(), (bit, diff)
    assert (uint_bits(values) == before).all(), "flip_bit changed its input"


@pytest.mark.parametrize("dtype, sign, exponent_msb", [
    (torch.float32, 31, 30), (torch.bfloat16, 15, 14), (torch.float16, 15, 14),
])
def test_named_bits(dtype, sign, exponent_msb):
    assert bit_index(dtype, "sign") == sign
    assert bit_index(dtype, "exponent_msb") == exponent_msb
    assert bit_index(dtype, 3) == 3
    half = torch.tensor([0.5, -2.0], dtype=dtype)
    assert flip_bit(half, sign).tolist() == [-0.5, 2.0]
    if dtype != torch.float16:  # 8 exponent bits: 0.5 = 2^-1 -> 2^127
        assert flip_bit(half[:1], exponent_msb).item() == 2.0**127


def test_bit_beyond_the_dtype_is_a_params_error():
    with pytest.raises(ParamsError) as info:
        bit_index(torch.bfloat16, 20)
    assert info.value.problems == ["validate.bit: 20 is beyond the 16 bits of bfloat16 weights; use sign, exponent_msb or 0..15"]
    with pytest.raises(ModelError, match="bit_flip needs float32, bfloat16 or float16 weights"):
        bit_index(torch.float64, "sign")


# ----------------------------------------------------------------------------- perturbing in place

SELECTION = {
    "model.layers.0.self_attn.q_proj.weight": np.array([0, 5, 17, 255], dtype=np.int64),
    "model.layers.1.mlp.down_proj.weight": np.array([3], dtype=np.int64),
    "lm_head.weight": np.array([2, 100, 1535], dtype=np.int64),
}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def expected_values(kind: str, original: dict[str, torch.Tensor], vp: ValidateParams, seed: int) -> dict[str, torch.Tensor]:
    """What each selected weight must become, computed independently of the library."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, index in SELECTION.items():
        w = original[name].reshape(-1)[torch.from_numpy(index)]
        if kind == "zero":
            out[name] = torch.zeros_like(w)
        elif kind == "sign_flip":
            out[name] = -w
        elif kind == "gauss_noise":
            noise = torch.from_numpy(rng.standard_normal(len(index)))
            out[name] = (w.double() + noise * vp.noise_sigma * w.double().abs()).to(w.dtype)
        else:
            flipped = uint_bits(w) ^ (1 << bit_index(w.dtype, vp.bit))  # unsigned, numpy
            signed = np.int32 if w.dtype == torch.float32 else np.int16
            out[name] = torch.from_numpy(flipped.view(signed).copy()).view(w.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["zero", "sign_flip", "gauss_noise", "bit_flip"])
def test_each_perturbation_changes_exactly_the_chosen_weights_and_restores_them(kind, dtype):
    model = build_tiny_model().to(dtype)
    weights = dict(model.named_parameters())
    original = snapshot(model)
    before = {n: digest(weights[n]) for n in SELECTION}
    vp = ValidateParams(noise_sigma=0.5, bit="exponent_msb")
    want = expected_values(kind, original, vp, seed=7)
    # every selected weight changes, bar noise that rounds back to the same bfloat16 value
    moved = {n: idx[uint_bits(want[n].clone()) != uint_bits(original[n].reshape(-1)[torch.from_numpy(idx)].clone())]
             for n, idx in SELECTION.items()}
    if kind != "gauss_noise":
        assert all(len(moved[n]) == len(SELECTION[n]) for n in SELECTION)
    with perturbed(weights, SELECTION, kind, vp, np.random.default_rng(7), before) as n_changed:
        assert n_changed == sum(len(i) for i in moved.values()) >= 6
        for name, p in model.named_parameters():
            now, was = uint_bits(p.detach().reshape(-1).clone()), uint_bits(original[name].reshape(-1).clone())
            changed = np.flatnonzero(now != was)
            assert changed.tolist() == moved.get(name, np.empty(0)).tolist(), name
            if name in SELECTION:
                got = p.detach().reshape(-1)[torch.from_numpy(SELECTION[name])]
                assert (uint_bits(got.clone()) == uint_bits(want[name].clone())).all(), name
    for name, p in model.named_parameters():
        assert torch.equal(uint_bits_t(p), uint_bits_t(original[name])), f"{name} not restored"


def uint_bits_t(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def test_bit_flip_on_bfloat16_flips_bit_14():
    model = build_tiny_model().to(torch.bfloat16)
    weights = dict(model.named_parameters())
    name = "lm_head.weight"
    sel = {name: np.array([7, 8], dtype=np.int64)}
    was = uint_bits(weights[name].detach().reshape(-1)[:10].clone())
    with perturbed(weights, sel, "bit_flip", ValidateParams(bit="exponent_msb"), np.random.default_rng(0),
                   {name: digest(weights[name])}):
        now = uint_bits(weights[name].detach().reshape(-1)[:10].clone())
        assert ((now ^ was) == np.array([0] * 7 + [1 << 14] * 2 + [0], dtype=np.uint16)).all()


def test_a_tensor_not_restored_bit_exactly_raises():
    model = build_tiny_model()
    weights = dict(model.named_parameters())
    before = {n: digest(weights[n]) for n in SELECTION}
    name = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(RestoreError, match=f"parameter {name}: not restored bit-exactly after zero"):
        with perturbed(weights, SELECTION, "zero", ValidateParams(), np.random.default_rng(0), before):
            with torch.no_grad():
                weights[name].view(-1)[4] += 1.0  # a weight outside the selection, in a touched tensor


def test_the_model_is_restored_when_the_measurement_fails():
    model = build_tiny_model()
    weights = dict(model.named_parameters())
    original = snapshot(model)
    with pytest.raises(KeyError):
        with perturbed(weights, SELECTION, "sign_flip", ValidateParams(), np.random.default_rng(0),
                       {n: digest(weights[n]) for n in SELECTION}):
            raise KeyError("boom")
    for name, p in model.named_parameters():
        assert torch.equal(uint_bits_t(p), uint_bits_t(original[name])), name


def test_gauss_noise_is_seeded():
    def run(seed: int) -> torch.Tensor:
        model = build_tiny_model()
        weights = dict(model.named_parameters())
        with perturbed(weights, SELECTION, "gauss_noise", ValidateParams(), np.random.default_rng(seed),
                       {n: digest(weights[n]) for n in SELECTION}):
            return weights["lm_head.weight"].detach().clone()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
