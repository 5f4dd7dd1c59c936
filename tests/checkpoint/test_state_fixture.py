"""Shaper state files written by an earlier megatron-shaping still load and continue bit-exactly.

``data/<case>.state.pt`` are shaper-state files (:func:`megatron_shaping.checkpoint.write_state_file`,
the file a DeepSpeed checkpoint holds; state ``format_version`` 1) written after ``SAVED_AT``
deterministic steps of a tiny model, by the code of commit b58c371, before "one shape for
composition" (issue 13) made every session's state a tuple of member states. ``data/<case>.expected.pt``
holds what that code did next: the shaped gradients of steps ``SAVED_AT..TOTAL-1`` and the state
dict after them. Two cases: a single shaper (spamp, the old bare state) and a mixed-granularity
chain (gradient_stabilizer per tensor + norm_clip on the global norm, the old regrouped member).

The files are committed; regenerate them only on purpose (the point is that they come from old
code): ``PYTHONPATH=. python tests/checkpoint/test_state_fixture.py``.
"""
import copy
import os
import sys

import pytest
import torch

from megatron_shaping import GradientShaper
from megatron_shaping.checkpoint import (ShaperStateMismatch, load_session, read_state_file, state_digest,
                                         write_state_file)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SAVED_AT, TOTAL = 3, 6
CASES = {
    "spamp": {"type": "spamp"},
    "chain_mixed": {"type": "chain", "shapers": [
        {"type": "gradient_stabilizer"},
        {"type": "norm_clip", "params": {"max_norm": 2.0}, "granularity": "global"}]},
}


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def set_grads(model, step):
    """Seeded gradients, with a spike on step 4 so that the shapers clip something."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=gen) * (1 + i) * (10.0 if step == 4 else 1.0)


def run(spec, steps, gs=None, model=None):
    """Shape ``steps`` with a fresh shaper (or ``gs``); returns the shaper, model and shaped grads."""
    model = model or tiny_model()
    gs = gs or GradientShaper(model.named_parameters(), copy.deepcopy(spec))
    shaped = []
    for s in steps:
        set_grads(model, s)
        gs.apply_()
        shaped.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return gs, model, shaped


def files(case):
    return os.path.join(DATA, f"{case}.state.pt"), os.path.join(DATA, f"{case}.expected.pt")


def resumed(case, spec, state_file=None):
    """A new shaper loaded from the committed file (or ``state_file``), run to the end."""
    model = tiny_model()
    gs = GradientShaper(model.named_parameters(), copy.deepcopy(spec))
    load_session(gs.session, state_file or files(case)[0])
    return run(spec, range(SAVED_AT, TOTAL), gs, model)


def assert_grads_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for n in x:
            assert torch.equal(x[n], y[n]), n


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_format_unchanged(case, monkeypatch):
    """The state this code writes after the same steps is the committed one, byte for byte, on
    the torch-op path the old code took (``MEGATRON_SHAPING_KERNELS=0``). The CPU sum kernel
    (stats/kernels.py) adds exact float64 squares where the old code added fp32 partial norms:
    the statistics, hence the state, differ in their last bits; with it the state has the same
    fields, dtypes and shapes and values within 1e-6 of the committed ones."""
    stored = read_state_file(files(case)[0])
    gs, _, _ = run(CASES[case], range(SAVED_AT))
    kern = gs.state_dict()
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "0")
    gs, _, _ = run(CASES[case], range(SAVED_AT))
    assert state_digest(gs.state_dict()) == stored["digest"]
    _assert_close(kern, stored["state"])


def _assert_close(a, b, path="state"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-6, atol=0), path
        else:
            assert torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.parametrize("case", sorted(CASES))
def test_old_state_continues_bit_exact(case, monkeypatch, tmp_path):
    """Resumed from the old file == the uninterrupted run of this code == what the old code did.

    The old code ran SPAMP's power map and the statistics as torch ops; the fused CPU kernels
    that replaced them (stats/kernels.py) round |g|^alpha within 1 ulp but not always to the same
    bits and sum exact float64 squares instead of fp32 partial norms, so the comparison with the
    old outputs takes the torch-op path (``MEGATRON_SHAPING_KERNELS=0``). With the kernels,
    resumed == uninterrupted is checked from a file this code wrote after the same steps (the
    old file's state carries the old statistics' last bits)."""
    state_file = os.path.join(str(tmp_path), f"{case}.state.pt")
    gs, _, _ = run(CASES[case], range(SAVED_AT))
    write_state_file(state_file, gs.state_dict())
    _, _, shaped = resumed(case, CASES[case], state_file)
    _, _, fresh = run(CASES[case], range(TOTAL))
    assert_grads_equal(shaped, fresh[SAVED_AT:])
    monkeypatch.setenv("MEGATRON_SHAPING_KERNELS", "0")
    expected = torch.load(files(case)[1], weights_only=True)
    gs, _, shaped = resumed(case, CASES[case])
    _, _, fresh = run(CASES[case], range(TOTAL))
    assert_grads_equal(shaped, fresh[SAVED_AT:])
    assert_grads_equal(shaped, expected["shaped"])
    assert state_digest(gs.state_dict()) == expected["final_digest"]
    assert gs.session.steps == TOTAL


def test_controls_can_fail(tmp_path):
    """A file loaded into another shaper or granularity is refused; a perturbed field shows."""
    spamp_file, chain_file = files("spamp")[0], files("chain_mixed")[0]
    with pytest.raises(ShaperStateMismatch, match="saved shaper"):
        load_session(GradientShaper(tiny_model().named_parameters(), "gradient_stabilizer").session, spamp_file)
    tensor_chain = copy.deepcopy(CASES["chain_mixed"])
    tensor_chain["shapers"][1]["granularity"] = "tensor"
    with pytest.raises(ShaperStateMismatch):
        load_session(GradientShaper(tiny_model().named_parameters(), tensor_chain).session, chain_file)
    for case, member, field in (("spamp", 0, "tau"), ("chain_mixed", 0, "m")):
        sd = read_state_file(files(case)[0])["state"]
        sd["members"][member]["fields"][field][0] *= 1 + 2.0 ** -20
        path = str(tmp_path / f"{case}.pt")
        write_state_file(path, sd)
        model = tiny_model()
        gs = GradientShaper(model.named_parameters(), copy.deepcopy(CASES[case]))
        load_session(gs.session, path)
        _, _, shaped = run(CASES[case], range(SAVED_AT, TOTAL), gs, model)
        _, _, fresh = run(CASES[case], range(TOTAL))
        assert not all(torch.equal(x[n], y[n]) for x, y in zip(shaped, fresh[SAVED_AT:]) for n in x), case


def regenerate():
    os.makedirs(DATA, exist_ok=True)
    for case, spec in CASES.items():
        state_file, expected_file = files(case)
        gs, model, _ = run(spec, range(SAVED_AT))
        write_state_file(state_file, gs.state_dict(), meta={"written_by": "tests/checkpoint/test_state_fixture.py"})
        gs, _, shaped = run(spec, range(SAVED_AT, TOTAL), gs, model)
        torch.save({"shaped": shaped, "final_digest": state_digest(gs.state_dict())}, expected_file)
        print(case, os.path.getsize(state_file), os.path.getsize(expected_file))


if __name__ == "__main__":
    sys.exit(regenerate())
