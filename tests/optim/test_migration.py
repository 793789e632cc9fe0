"""Resuming a peer's checkpoint with optimlib: ``adamp`` (AdamP, SGDP), ``galore_torch.GaLoreAdamW``
and ``pytorch_optimizer`` (AdamP, SGDP, GaLore).

Each case trains a small MLP N steps with the peer, saves model and optimizer with ``torch.save``,
reads the checkpoint back (``weights_only=True``: :func:`optimlib.optim.migrate.load_peer_checkpoint`
maps the peers' pickled projectors to a plain attribute holder), resumes with optimlib's optimizer
for M more steps and compares with the peer's uninterrupted N + M run.  The same tolerance bounds
the parity gap of an uninterrupted optimlib run with the peer's settings (N + M steps), so the
resume adds nothing to it.  Relative errors (max |diff| / max |param| per tensor), measured
resume / parity gap:

* bit-exact where optimlib's step is the peer's to the bit: ``adamp.SGDP``, galore-torch with
  ``projection="svd", canonical_signs=False`` (every ``proj_type``), pytorch_optimizer's SGDP with
  Nesterov momentum;
* ``adamp.AdamP``: 1e-6 (tests/optim/test_adamp.py; 5.8e-8 / 1.7e-7);
* pytorch_optimizer's AdamP: 1e-4 (4.6e-6 / 6.4e-5): it adds ``eps`` to ``sqrt(v)`` before the bias
  correction (adamp after it), which weighs most in the first steps, and updates with ``lerp``;
* pytorch_optimizer's GaLore: 1e-6 at rank 3 (5.3e-7 / 6.4e-7), 3e-5 at full rank (``rank=None``;
  8.9e-6 / 1.6e-5): ``lerp``, a multiplicative weight decay and a row-major basis round
  differently, and Adam normalises the small coordinates of a full-rank projection.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import optimlib
from optimlib.optim.migrate import (PeerProjector, convert_state_dict, detect_source, load_peer_checkpoint,
                                    peer_safe_globals)

adamp = pytest.importorskip("adamp")
galore_torch = pytest.importorskip("galore_torch")
pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")   # galore-torch's AdamW deprecation notice

N, M = 5, 7
GAP = 3          # refreshes before and after the save; galore-torch refreshes on resumed step 6
XS = [torch.randn(40, 12, generator=torch.Generator().manual_seed(i)) for i in range(N + M + 1)]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 33), nn.GELU(), nn.Linear(33, 21), nn.LayerNorm(21), nn.Linear(21, 4))


def groups(model, lowrank=None):
    """galore-torch's grouping: the 2-D weights (low-rank with ``lowrank``), then the rest."""
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": mats, **(lowrank or {})}, {"params": rest}]


def train(model, opt, xs):
    for x in xs:
        opt.zero_grad()
        (model(x) - torch.sin(x[:, :4])).pow(2).mean().backward()
        opt.step()


def rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def peer_checkpoint(peer, lowrank, steps=N) -> bytes:
    model = make_model()
    opt = peer(groups(model, lowrank))
    train(model, opt, XS[:steps])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    return buf.getvalue()


def resume(ours, lowrank, checkpoint: dict, steps=M, start=N):
    model = make_model()
    model.load_state_dict(checkpoint["model"])
    opt = ours(groups(model, lowrank))
    opt.load_state_dict(checkpoint["optimizer"])
    train(model, opt, XS[start:start + steps])
    return model, opt


def uninterrupted(make_opt, lowrank, steps=N + M):
    model = make_model()
    train(model, make_opt(groups(model, lowrank)), XS[:steps])
    return list(model.parameters())


SVD_EXACT = {"projection": "svd", "canonical_signs": False}
PO_GALORE = {"rank": 3, "update_proj_gap": GAP, "scale": 0.25, "projection_type": "std"}
CASES = {   # name: (peer class, optimlib class and its own options, hyper-parameters, low-rank keys, tolerance)
    "adamp.AdamP": (lambda: adamp.AdamP, (optimlib.AdamP, {}), dict(lr=1e-2, weight_decay=1e-2, nesterov=True),
                    None, 1e-6),
    "adamp.SGDP": (lambda: adamp.SGDP, (optimlib.SGDP, {}), dict(lr=5e-2, momentum=0.9, weight_decay=1e-3), None, 0),
    "adamp.SGDP nesterov": (lambda: adamp.SGDP, (optimlib.SGDP, {}),
                            dict(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=1e-3), None, 0),
    "adamp.SGDP no momentum": (lambda: adamp.SGDP, (optimlib.SGDP, {}), dict(lr=5e-2, weight_decay=1e-3), None, 0),
    **{f"galore_torch {proj_type}": (lambda: galore_torch.GaLoreAdamW, (optimlib.GaLoreAdamW, SVD_EXACT),
                                     dict(lr=3e-3, weight_decay=0.05),
                                     {"rank": 3, "update_proj_gap": GAP, "scale": 0.25, "proj_type": proj_type}, 0)
       for proj_type in ("std", "reverse_std", "left", "right")},
    "pytorch_optimizer.AdamP": (lambda: pytorch_optimizer.AdamP, (optimlib.AdamP, {}),
                                dict(lr=1e-2, weight_decay=1e-2), None, 1e-4),
    "pytorch_optimizer.SGDP nesterov": (lambda: pytorch_optimizer.SGDP, (optimlib.SGDP, {}),
                                        dict(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=1e-3), None, 0),
    "pytorch_optimizer.GaLore": (lambda: pytorch_optimizer.GaLore, (optimlib.GaLoreAdamW, SVD_EXACT),
                                 dict(lr=3e-3, weight_decay=0.05), PO_GALORE, 1e-6),
    "pytorch_optimizer.GaLore rank=None": (lambda: pytorch_optimizer.GaLore, (optimlib.GaLoreAdamW, SVD_EXACT),
                                           dict(lr=3e-3, weight_decay=0.05), {**PO_GALORE, "rank": None}, 3e-5),
}


def optimlib_keys(lowrank):
    """The optimlib group keys of a peer's low-rank group: pytorch_optimizer's ``projection_type`` is
    ``proj_type``, its refreshes come one step later (``refresh_offsets`` 1) and ``rank=None`` is
    every singular vector (21: the largest rank of the model's matrices)."""
    if lowrank is None or "projection_type" not in lowrank:
        return lowrank
    keys = {k: v for k, v in lowrank.items() if k != "projection_type"}
    return {**keys, "proj_type": lowrank["projection_type"], "rank": lowrank["rank"] or 21, "refresh_offsets": [1] * 3}


def case_parts(case):
    """``(peer(groups), ours(groups) for the resume, ours(groups) with the peer's hyper-parameters,
    low-rank keys, tolerance)`` of a case."""
    peer_cls, (ours_cls, own), hyper, lowrank, tolerance = CASES[case]
    return (lambda g: peer_cls()(g, **hyper), lambda g: ours_cls(g, **own), lambda g: ours_cls(g, **hyper, **own),
            lowrank, tolerance)


@pytest.mark.parametrize("case", list(CASES))
def test_resuming_a_peer_checkpoint_continues_as_the_peer(case):
    peer, ours, ours_fresh, lowrank, tolerance = case_parts(case)
    checkpoint = load_peer_checkpoint(io.BytesIO(peer_checkpoint(peer, lowrank)))
    model, opt = resume(ours, lowrank, checkpoint)   # the hyper-parameters come from the checkpoint
    reference = uninterrupted(peer, lowrank)
    parity = uninterrupted(ours_fresh, optimlib_keys(lowrank)) if tolerance else reference
    for i, (ref, got) in enumerate(zip(reference, model.parameters())):
        if tolerance:
            assert rel(ref, got.detach()) <= tolerance, i
            assert rel(ref, parity[i].detach()) <= tolerance, i   # the parity gap the resume inherits
        else:
            assert torch.equal(ref, got), (i, rel(ref, got.detach()))
    # What optimlib saves from here is its own format, plain tensors and numbers.
    state = torch.load(io.BytesIO(_saved(opt)), weights_only=True)["state"]
    assert all(isinstance(v, (torch.Tensor, int)) for s in state.values() for v in s.values())
    # (adamp.SGDP counts no steps: optimlib's count starts at the resume)
    assert [int(s["step"]) for s in state.values()] == [M if case.startswith("adamp.SGDP") else N + M] * len(state)


def _saved(opt) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def test_galore_torch_resumed_on_a_refresh_step_is_exact():
    peer, ours, _, lowrank, _ = case_parts("galore_torch std")
    checkpoint = load_peer_checkpoint(io.BytesIO(peer_checkpoint(peer, lowrank, steps=2 * GAP)))
    model, _ = resume(ours, lowrank, checkpoint, steps=N + M - 2 * GAP, start=2 * GAP)
    assert all(map(torch.equal, uninterrupted(peer, lowrank), model.parameters()))


def test_the_projector_becomes_optimlibs_basis():
    peer, ours, _, lowrank, _ = case_parts("galore_torch std")
    checkpoint = torch.load(io.BytesIO(peer_checkpoint(peer, lowrank)), weights_only=False)   # the peer's objects
    model = make_model()
    opt = ours(groups(model, lowrank))
    converted = convert_state_dict(checkpoint["optimizer"], opt)
    for pid, p in enumerate(groups(model)[0]["params"]):
        peer_state, state = checkpoint["optimizer"]["state"][pid], converted["state"][pid]
        basis = peer_state["projector"].ortho_matrix
        assert torch.equal(state["basis"], basis) and state["basis"].stride() == (1, basis.shape[0])
        assert state["rank"] == 3 and state["step"] == N and state["moment_step"] == N
        assert state["refreshes"] == 2   # steps 0 and 3 of 5
        assert state["exp_avg"] is peer_state["exp_avg"] and "projector" not in state
    assert "projector" in checkpoint["optimizer"]["state"][0]   # the argument is not modified


def test_loading_projectors_needs_no_weights_only_false():
    peer, _, _, lowrank, _ = case_parts("galore_torch std")
    data = peer_checkpoint(peer, lowrank)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(io.BytesIO(data), weights_only=True)
    with torch.serialization.safe_globals(peer_safe_globals()):
        plain = torch.load(io.BytesIO(data), weights_only=True)
    projector = plain["optimizer"]["state"][0]["projector"]
    assert isinstance(projector, PeerProjector) and projector.proj_type == "std"
    trusted = torch.load(io.BytesIO(data), weights_only=False)["optimizer"]["state"][0]["projector"]
    assert vars(projector).keys() == vars(trusted).keys()
    assert torch.equal(projector.ortho_matrix, trusted.ortho_matrix)


def test_detect_source():
    model = make_model()
    assert detect_source(optimlib.AdamP(model.parameters()).state_dict()) is None
    for case, source in (("adamp.AdamP", None), ("adamp.SGDP", "adamp"), ("galore_torch std", "galore_torch"),
                         ("pytorch_optimizer.AdamP", "pytorch_optimizer"),
                         ("pytorch_optimizer.GaLore", "pytorch_optimizer")):
        peer, _, _, lowrank, _ = case_parts(case)
        assert detect_source(load_peer_checkpoint(io.BytesIO(peer_checkpoint(peer, lowrank, 1)))["optimizer"]) \
            == source, case


def test_optimlibs_own_state_dict_is_returned_as_it_is():
    model = make_model()
    opt = optimlib.GaLoreAdamW(groups(model, {"rank": 2}))
    train(model, opt, XS[:2])
    state_dict = opt.state_dict()
    assert convert_state_dict(state_dict, opt) is state_dict


def _peer_state(case, steps=1):
    peer, _, _, lowrank, _ = case_parts(case)
    return load_peer_checkpoint(io.BytesIO(peer_checkpoint(peer, lowrank, steps)))["optimizer"]


@pytest.mark.parametrize("edit, ours, match", [
    (lambda sd: sd["param_groups"][0].update(weight_decouple=False), optimlib.AdamP,
     r"pytorch_optimizer option weight_decouple=False is not implemented"),
    (lambda sd: sd["param_groups"][1].update(adam_debias=True), optimlib.AdamP, r"adam_debias=True"),
    (lambda sd: sd["param_groups"].reverse(), optimlib.AdamP, r"param groups of \[5, 3\] parameters, the "
     r"optimizer \[3, 5\]"),
])
def test_unsupported_pytorch_optimizer_states_are_refused(edit, ours, match):
    state_dict = _peer_state("pytorch_optimizer.AdamP")
    edit(state_dict)
    with pytest.raises(ValueError, match=match):
        ours(groups(make_model())).load_state_dict(state_dict)


def test_a_state_for_another_parameter_is_refused_by_name():
    state_dict = _peer_state("adamp.SGDP")
    model = make_model()
    mats = [p for p in model.parameters() if p.dim() == 2]
    opt = optimlib.SGDP([{"params": mats[::-1], "names": ["c", "b", "a"]},
                         {"params": [p for p in model.parameters() if p.dim() < 2]}], momentum=0.9)
    with pytest.raises(ValueError, match=r"parameter c has momentum_buffer of shape \(33, 12\) in the checkpoint, "
                                         r"SGDP needs \(4, 21\)"):
        opt.load_state_dict(state_dict)


@pytest.mark.parametrize("case, ours, match", [
    ("galore_torch std", lambda g: optimlib.GaLoreAdamW(g, inner="adamp"), r"inner='adamw'"),
    ("galore_torch std", lambda g: optimlib.GaLoreAdamW(g, moments_dtype="int8"), r"moments_dtype=None"),
    ("galore_torch std", lambda g: optimlib.AdamP(g), r"a galore_torch state dict cannot be loaded into AdamP"),
    ("adamp.SGDP", lambda g: optimlib.GaLoreAdamW(g), r"a adamp state dict cannot be loaded into GaLoreAdamW"),
])
def test_states_another_optimizer_would_misread_are_refused(case, ours, match):
    state_dict = _peer_state(case)
    lowrank = CASES[case][3]
    with pytest.raises(ValueError, match=match):
        ours(groups(make_model(), lowrank)).load_state_dict(state_dict)


def test_a_full_projection_is_refused():
    state_dict = copy.deepcopy(_peer_state("galore_torch std"))
    state_dict["state"][0]["projector"].proj_type = "full"
    with pytest.raises(ValueError, match=r"parameter group0.param0 uses galore_torch's proj_type='full'"):
        optimlib.GaLoreAdamW(groups(make_model(), CASES["galore_torch std"][3])).load_state_dict(state_dict)


def test_pytorch_optimizers_sgdp_without_nesterov_resumes_with_a_warning():
    state_dict = load_peer_checkpoint(io.BytesIO(peer_checkpoint(
        lambda g: pytorch_optimizer.SGDP(g, lr=5e-2, momentum=0.9), None, 2)))["optimizer"]
    opt = optimlib.SGDP(groups(make_model()))
    with pytest.warns(UserWarning, match="the resumed run follows adamp's SGDP"):
        opt.load_state_dict(state_dict)
    assert [float(s["step"]) for s in opt.state.values()] == [2.0] * 8
    assert all(torch.equal(opt.state[p]["momentum_buffer"], state_dict["state"][i]["momentum"])
               for i, p in enumerate(p for g in opt.param_groups for p in g["params"]))
