"""megatron_shaping.checkpoint in one process: the state file, its validation and restore."""
import io
import os

import pytest
import torch

from megatron_shaping import GradientShaper
from megatron_shaping.checkpoint import (STATE_FILE, ShaperStateCorrupt, ShaperStateError, ShaperStateMismatch,
                                         ShaperStateMissing, hparam_changes, load_session, pack_state, payload_digest,
                                         read_state_file, restored_session, save_session, state_digest,
                                         state_is_finite, write_bytes_atomic, write_state_file)

from .plans import SHAPERS


class Net(torch.nn.Module):
    def __init__(self, extra=False, reverse=False):
        super().__init__()
        names = ["a", "b"] + (["c"] if extra else [])
        for n in (reversed(names) if reverse else names):
            setattr(self, n, torch.nn.Linear(5, 5))

    def forward(self, x):
        for n in ("a", "b", "c"):
            if hasattr(self, n):
                x = torch.tanh(getattr(self, n)(x))
        return x


def trained(spec, steps=4, seed=0, **kw):
    torch.manual_seed(seed)
    m = Net(**kw)
    gs = GradientShaper(m.named_parameters(), spec, granularity=spec.get("granularity"))
    for s in range(steps):
        m.zero_grad()
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(s))
        (m(x).square().mean() * (1 + 3 * s)).backward()
        gs.apply_()
    return m, gs


def sd_equal(a, b):
    assert a["groups"] == b["groups"] and a["steps"] == b["steps"] and a["skipped"] == b["skipped"]
    for ma, mb in zip(a["members"], b["members"]):
        assert ma["type"] == mb["type"]
        for k in ma["fields"]:
            assert torch.equal(ma["fields"][k], mb["fields"][k]), k


CHAIN = {"type": "chain", "shapers": [{"type": "agc", "params": {"clipping": 0.01}},
                                      {"type": "norm_clip", "params": {"max_norm": 0.05}, "granularity": "global"}]}


@pytest.mark.parametrize("name", list(SHAPERS) + ["chain"])
def test_round_trip_every_shaper(tmp_path, name):
    spec = CHAIN if name == "chain" else SHAPERS[name]
    _, gs = trained(spec)
    path = str(tmp_path / STATE_FILE)
    digest = save_session(gs.session, path, {"global_steps": 4})
    _, fresh = trained(spec, steps=0)
    meta = load_session(fresh.session, path)
    assert meta == {"global_steps": 4}
    sd_equal(fresh.state_dict(), gs.state_dict())
    assert read_state_file(path)["digest"] == digest == state_digest(gs.state_dict())


def test_remap_by_name_when_parameters_are_registered_in_another_order(tmp_path):
    _, gs = trained(SHAPERS["gradient_stabilizer"])
    path = str(tmp_path / STATE_FILE)
    save_session(gs.session, path)
    _, other = trained(SHAPERS["gradient_stabilizer"], steps=0, reverse=True)
    assert list(other.session.layout.names) != list(gs.session.layout.names)
    load_session(other.session, path)
    a, b = gs.state_dict(), other.state_dict()
    for i, n in enumerate(b["groups"]):
        j = a["groups"].index(n)
        for f in ("m", "v", "count"):
            assert torch.equal(b["members"][0]["fields"][f][i], a["members"][0]["fields"][f][j])


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "global_step3" / STATE_FILE)
    with pytest.raises(ShaperStateMissing, match="file not found") as e:
        read_state_file(path)
    assert path in str(e.value) and "allow_fresh_state" in str(e.value)


@pytest.mark.parametrize("cut", [0, 1, 30, 200, -40, -1])
def test_truncated_file_is_corrupt(tmp_path, cut):
    _, gs = trained(SHAPERS["zclip"])
    path = str(tmp_path / STATE_FILE)
    save_session(gs.session, path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(cut if cut >= 0 else size + cut)
    with pytest.raises(ShaperStateCorrupt, match="truncated or corrupt") as e:
        read_state_file(path)
    assert path in str(e.value)


def test_changed_tensor_fails_the_digest(tmp_path):
    """A damaged value that still unpickles (the zip layer does not always notice) is caught
    by the digest."""
    _, gs = trained(SHAPERS["gradient_stabilizer"])
    sd = gs.state_dict()
    payload = pack_state(sd)
    payload["state"]["members"][0]["fields"]["m"][0] += 1e-3
    path = str(tmp_path / STATE_FILE)
    torch.save(payload, path)
    with pytest.raises(ShaperStateCorrupt, match="digest") as e:
        read_state_file(path)
    assert path in str(e.value)


def test_other_files_and_formats_count_as_missing(tmp_path):
    p = str(tmp_path / "x.pt")
    torch.save({"module": {}}, p)
    with pytest.raises(ShaperStateMissing, match="not a megatron-shaping shaper state file"):
        read_state_file(p)
    _, gs = trained(SHAPERS["gradient_stabilizer"])
    torch.save(pack_state(dict(gs.state_dict(), format_version=0)), p)
    with pytest.raises(ShaperStateMissing, match="format_version 0 is not supported"):
        read_state_file(p)
    other = dict(pack_state(gs.state_dict()), file_version=99)
    other["payload_digest"] = payload_digest(other)          # a consistent file of another version
    torch.save(other, p)
    with pytest.raises(ShaperStateMissing, match="file version 99"):
        read_state_file(p)
    legacy = pack_state(gs.state_dict())
    del legacy["payload_digest"]                             # files written before the payload digest
    torch.save(dict(legacy, file_version=99), p)
    with pytest.raises(ShaperStateMissing, match="file version 99"):
        read_state_file(p)
    torch.save(legacy, p)
    assert read_state_file(p)["digest"] == legacy["digest"]


@pytest.mark.parametrize("key,value", [("kind", "megatron_shaping.shaper_statf"), ("file_version", 3),
                                       ("meta", {"tag": "global_step3", "global_steps": 7})])
def test_damaged_header_or_meta_is_corrupt_not_missing(tmp_path, key, value):
    """A damaged ``kind`` or version number would read as a file of another format (which
    ``allow_fresh_state`` lets through: a silent reset), a damaged meta as another step: the
    payload digest reports both as damage (without it, this test's first two cases raise
    ShaperStateMissing and the third loads)."""
    _, gs = trained(SHAPERS["gradient_stabilizer"])
    payload = pack_state(gs.state_dict(), {"tag": "global_step3", "global_steps": 3})
    payload[key] = value
    path = str(tmp_path / STATE_FILE)
    torch.save(payload, path)
    with pytest.raises(ShaperStateCorrupt, match="payload digest") as e:
        read_state_file(path)
    assert path in str(e.value)


def test_file_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    p = str(tmp_path / STATE_FILE)
    torch.save({"kind": "megatron_shaping.shaper_state", "evil": Evil()}, p)
    with pytest.raises(ShaperStateCorrupt):
        read_state_file(p)


@pytest.mark.parametrize("spec, kw, match", [
    (SHAPERS["spamp"], {}, r"saved shaper \['gradient_stabilizer'\] != configured \['spamp'\]"),
    (dict(SHAPERS["gradient_stabilizer"], granularity="global"), {}, "saved granularity 'tensor' != configured"),
    (SHAPERS["gradient_stabilizer"], {"extra": True}, r"covers other layers: missing \['c.bias', 'c.weight'\]"),
])
def test_mismatch_names_file_and_difference_and_leaves_session_untouched(tmp_path, spec, kw, match):
    _, gs = trained(SHAPERS["gradient_stabilizer"])
    path = str(tmp_path / STATE_FILE)
    save_session(gs.session, path)
    _, other = trained(spec, steps=2, **kw)
    before = other.state_dict()
    with pytest.raises(ShaperStateMismatch, match=match) as e:
        load_session(other.session, path)
    assert path in str(e.value)
    sd_equal(other.state_dict(), before)


def test_shape_mismatch(tmp_path):
    _, gs = trained(SHAPERS["zclip"])
    path = str(tmp_path / STATE_FILE)
    save_session(gs.session, path)
    spec = {"type": "zclip", "params": dict(SHAPERS["zclip"]["params"], warmup_steps=5)}
    _, other = trained(spec, steps=0)
    with pytest.raises(ShaperStateMismatch, match=r"zclip.buffer has shape \(1, 2\), expected \(1, 5\)"):
        load_session(other.session, path)


def test_restored_session_is_a_copy():
    _, gs = trained(SHAPERS["gradient_stabilizer"])
    _, fresh = trained(SHAPERS["gradient_stabilizer"], steps=0)
    before = fresh.state_dict()
    trial = restored_session(fresh.session, gs.state_dict(), "x")
    sd_equal(fresh.state_dict(), before)
    assert trial.steps == 4 and fresh.session.steps == 0


def test_hparam_changes_are_listed_not_refused(tmp_path):
    _, gs = trained(SHAPERS["gradient_stabilizer"])
    _, other = trained({"type": "gradient_stabilizer", "params": {"beta1": 0.5}}, steps=0)
    changes = hparam_changes(other.session, gs.state_dict())
    assert changes == ["gradient_stabilizer[0].beta1: saved 0.6, configured 0.5"]
    path = str(tmp_path / STATE_FILE)
    save_session(gs.session, path)
    load_session(other.session, path)
    assert other.session.steps == 4


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path, monkeypatch):
    path = str(tmp_path / "latest")
    write_bytes_atomic(path, b"global_step2")

    def boom(*a):
        raise KeyboardInterrupt("killed between write and rename")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(path, b"global_step4")
    monkeypatch.undo()
    assert open(path, "rb").read() == b"global_step2"
    assert os.listdir(tmp_path) == ["latest"], "temporary file left behind"


def test_write_state_file_is_readable_by_plain_torch_load(tmp_path):
    _, gs = trained(SHAPERS["adagc"])
    path = str(tmp_path / STATE_FILE)
    write_state_file(path, gs.state_dict(), {"tag": "t"})
    with open(path, "rb") as f:
        obj = torch.load(io.BytesIO(f.read()), weights_only=True)
    assert obj["kind"] == "megatron_shaping.shaper_state" and obj["meta"] == {"tag": "t"}
    assert state_is_finite(obj["state"])


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    # mkstemp's 0600 survived os.replace: `latest` and the state file were unreadable to the
    # other users DeepSpeed's own files (umask mode) are readable to
    old = os.umask(0o022)
    try:
        _, gs = trained(SHAPERS["zclip"])
        path = str(tmp_path / STATE_FILE)
        save_session(gs.session, path)
        write_bytes_atomic(str(tmp_path / "latest"), b"global_step4")
        os.umask(0o077)
        write_bytes_atomic(str(tmp_path / "private"), b"x")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "latest").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "private").st_mode & 0o777 == 0o600


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc (Linux)")
def test_the_umask_is_read_without_setting_it(tmp_path, monkeypatch):
    """os.umask reads the umask only by setting it (to 0 for a moment: a file another thread
    creates then gets mode 0666); on Linux it is read from /proc instead."""
    from megatron_shaping.checkpoint import _created_mode
    old = os.umask(0o027)
    try:
        def no_set(*a):
            raise AssertionError("os.umask called: the process umask was changed to read it")
        monkeypatch.setattr(os, "umask", no_set)
        assert _created_mode() == 0o640
        write_bytes_atomic(str(tmp_path / "latest"), b"global_step4")
        monkeypatch.undo()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "latest").st_mode & 0o777 == 0o640


def test_an_unreadable_file_is_not_called_corrupt(tmp_path, monkeypatch):
    # (as root a chmod would not stop the read: the open is made to fail)
    import builtins
    _, gs = trained(SHAPERS["zclip"])
    path = str(tmp_path / STATE_FILE)
    save_session(gs.session, path)
    real_open = builtins.open

    def denied(file, *a, **k):
        if str(file) == path:
            raise PermissionError(13, "Permission denied", path)
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(ShaperStateError, match="cannot be read.*PermissionError.*may be intact") as e:
        read_state_file(path)
    assert not isinstance(e.value, (ShaperStateCorrupt, ShaperStateMissing)) and path in str(e.value)


def test_a_chain_members_changed_granularity_is_named(tmp_path):
    # the session's granularity is 'tensor' either way, so only the member's groups differ: the
    # error said "saved groups of chain member norm_clip differ" and nothing else
    def spec(gran):
        return {"type": "chain", "shapers": [{"type": "gradient_stabilizer"},
                                             {"type": "norm_clip", "params": {"max_norm": 0.05}, "granularity": gran}]}
    _, gs = trained(spec("global"))
    path = str(tmp_path / STATE_FILE)
    save_session(gs.session, path)
    _, other = trained(spec("tensor"), steps=1)
    with pytest.raises(ShaperStateMismatch, match=r"chain member 1 \(norm_clip\) .*granularity 'tensor': 4 groups, "
                                                  r"saved 1\): missing \['a.bias', .*unexpected \['global'\]"):
        load_session(other.session, path)
