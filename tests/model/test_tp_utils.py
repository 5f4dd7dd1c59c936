import pytest
import torch

from megatron_shaping.model.tp_utils import full_shape, is_tp_duplicate, param_seed, seeded_normal_init


def _sharded(shape, dim):
    p = torch.nn.Parameter(torch.zeros(shape))
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
    return p


def test_full_shape_multiplies_partition_dim():
    assert full_shape(_sharded((32, 64), 0), tp_world_size=4) == (128, 64)
    assert full_shape(_sharded((32, 64), 1), tp_world_size=2) == (32, 128)
    replicated = torch.nn.Parameter(torch.zeros(64))
    replicated.tensor_model_parallel = False
    assert full_shape(replicated, tp_world_size=4) == (64,)
    assert full_shape(torch.nn.Parameter(torch.zeros(3, 5)), tp_world_size=8) == (3, 5)


def test_is_tp_duplicate():
    sharded = _sharded((4, 4), 0)
    replicated = torch.nn.Parameter(torch.zeros(4))
    assert not is_tp_duplicate(sharded, tp_rank=1)
    assert not is_tp_duplicate(replicated, tp_rank=0)
    assert is_tp_duplicate(replicated, tp_rank=1)


def test_seeded_init_depends_on_name_and_seed_only():
    a, b, c, d = (torch.empty(8, 4) for _ in range(4))
    seeded_normal_init("layers.0.attn.q_proj.weight", 1, 0.02)(a)
    torch.manual_seed(999)   # the global RNG must not matter
    seeded_normal_init("layers.0.attn.q_proj.weight", 1, 0.02)(b)
    seeded_normal_init("layers.0.attn.k_proj.weight", 1, 0.02)(c)
    seeded_normal_init("layers.0.attn.q_proj.weight", 2, 0.02)(d)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert abs(a.std().item() - 0.02) < 0.01
    assert param_seed(1, "x") == param_seed(1, "x") != param_seed(1, "y")


def test_one_copy_of_the_tp_attribute_readers():
    """model.tp_utils and the DeepSpeed integration read TP attributes through megatron_shaping.stats.tp:
    DeepSpeed's ``model_parallel`` flag counts as sharded, a ZeRO-3 parameter's shape is its ``ds_shape``."""
    from megatron_shaping.integrations.deepspeed import engine
    from megatron_shaping.model import tp_utils
    from megatron_shaping.stats import tp
    assert engine._full_shape is tp.full_shape and engine._is_tp_sharded is tp.is_tp_sharded
    assert tp_utils.is_tp_sharded is tp.is_tp_sharded
    ds_flag = torch.nn.Parameter(torch.zeros(4, 6))
    ds_flag.model_parallel, ds_flag.partition_dim = True, 1
    assert tp.is_tp_sharded(ds_flag) and full_shape(ds_flag, tp_world_size=3) == (4, 18)
    assert not is_tp_duplicate(ds_flag, tp_rank=2)
    zero3 = _sharded((32, 64), 0)
    zero3.data = torch.empty(0)                 # ZeRO-3 leaves an empty tensor and keeps the shape aside
    zero3.ds_shape = torch.Size((32, 64))
    assert tp.local_shape(zero3) == (32, 64) and full_shape(zero3, tp_world_size=2) == (64, 64)
    assert full_shape(_sharded((32, 64), 0)) == (32, 64)       # no parallel state: TP size 1
    # DeepSpeed AutoTP (LinearAllreduce: row-parallel) sets tensor_model_parallel but keeps the
    # split dimension in its universal-checkpoint metadata: read there (0 was assumed)
    autotp = torch.nn.Parameter(torch.zeros(8, 3))
    autotp.tensor_model_parallel = True
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    assert tp.AUTOTP_META == DS_AUTOTP_UC_META
    setattr(autotp, tp.AUTOTP_META, {"partition_type": "row", "partition_dim": 1})
    assert tp.partition_dim(autotp) == 1 and full_shape(autotp, tp_world_size=2) == (8, 6)
    unknown = torch.nn.Parameter(torch.zeros(8, 3))
    unknown.tensor_model_parallel = True
    with pytest.raises(ValueError, match=r"local shape \(8, 3\) does not say which dimension"):
        full_shape(unknown, tp_world_size=2)
    scalar = torch.nn.Parameter(torch.tensor(2.0))
    scalar.data = torch.empty(0)                # a 0-d parameter partitioned by ZeRO-3: ds_shape ()
    scalar.ds_shape = torch.Size(())
    assert tp.local_shape(scalar) == ()         # one element, not the empty stand-in's (0,)


def test_gather_full_tensor_concatenates_contiguous_shards_and_refuses_strided_ones(monkeypatch):
    """Two TP ranks simulated (the group size and all_gather stubbed): contiguous shards are
    concatenated along partition_dim; a strided shard (partition_stride 2, whose rows interleave)
    is refused by name instead of being concatenated into the wrong order."""
    from megatron_shaping.model import tp_utils

    monkeypatch.setattr(tp_utils, "_tp_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)

    def all_gather(parts, t, group=None):         # rank r holds t + 10 r
        for r, p in enumerate(parts):
            p.copy_(t + 10 * r)
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)

    def shard(dim, stride):
        p = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, stride
        return p

    for dim in (0, 1):
        p = shard(dim, 1)
        want = torch.cat([p.detach(), p.detach() + 10], dim=dim)
        assert torch.equal(tp_utils.gather_full_tensor(p.detach(), p, group=object()), want)
    p = shard(0, 2)
    with pytest.raises(ValueError, match="partition_stride 2"):
        tp_utils.gather_full_tensor(p.detach(), p, group=object())
