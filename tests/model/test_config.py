import json
import re

import pytest

from megatron_shaping.model import available_presets, load_preset
from megatron_shaping.model.config import PRESET_DIR


def test_presets_load():
    names = available_presets()
    for required in ["llama-tiny", "llama-130m", "llama-350m", "llama-1b", "llama-7b"]:
        assert required in names
    for n in names:
        cfg = load_preset(n)
        assert cfg.padded_vocab_size % 128 == 0 and cfg.padded_vocab_size >= cfg.vocab_size


def test_published_shapes():
    c = load_preset("llama-7b")
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.ffn_hidden_size) == (4096, 32, 32, 11008)
    assert 6.5e9 < c.num_parameters() < 7.0e9
    c = load_preset("llama-130m")
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.ffn_hidden_size) == (768, 12, 12, 2048)


def test_overrides_and_errors(tmp_path):
    assert load_preset("llama-tiny", vocab_size=1000, seq_length=None).vocab_size == 1000
    with pytest.raises(FileNotFoundError, match="llama-tiny"):
        load_preset("no-such-model")
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({**json.loads((PRESET_DIR / "llama-tiny.json").read_text()), "hiden_size": 3}))
    with pytest.raises(ValueError, match="hiden_size"):
        load_preset(str(bad))
    with pytest.raises(ValueError, match="not divisible by 4"):
        load_preset("llama-tiny").check_tensor_parallel(4)


@pytest.mark.parametrize("key,value", [("hidden_size", "64"), ("num_query_groups", 0), ("num_layers", 2.0),
                                       ("make_vocab_size_divisible_by", 0), ("norm_eps", -1e-5),
                                       ("init_std", float("nan")), ("fp8", "false"), ("tie_embeddings", 1)])
def test_bad_preset_values_name_the_file_and_key(tmp_path, key, value):
    # a string size raised "not all arguments converted", 0 a ZeroDivisionError, fp8 "false"
    # (a non-empty string) turned FP8 on, negative eps was accepted
    base = json.loads((PRESET_DIR / "llama-tiny.json").read_text())
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({**base, key: value}))
    with pytest.raises(ValueError, match=rf"model preset {re.escape(str(bad))}: model config: {key} must be"):
        load_preset(str(bad))
