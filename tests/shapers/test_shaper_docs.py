"""docs/SHAPERS.md: every config block builds, every knob of every shaper is documented."""
import json
import pathlib
import re

import pytest

from megatron_shaping.core import shaper_from_spec
from megatron_shaping.shapers import REGISTRY, shaper_class

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "SHAPERS.md"


def blocks():
    return [json.loads(b) for b in re.findall(r"```json\n(.*?)```", DOC.read_text(), re.S)]


def test_every_config_block_builds():
    seen = set()
    for block in blocks():
        spec = block["gradient_shaping"]
        shaper = shaper_from_spec(spec)
        seen.add(spec["type"])
        if spec["type"] != "chain":
            # the documented block spells out the defaults: it must agree with the code
            defaults = shaper_class(spec["type"])()
            documented = {k: v for k, v in spec["params"].items()}
            for k, v in documented.items():
                if not (spec["type"] == "zclip" and k == "max_grad_norm"):   # documented as null on purpose
                    assert getattr(defaults, k) == v, (spec["type"], k)
            assert getattr(shaper, "name") == spec["type"]
    assert set(REGISTRY) <= seen


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_knob_has_a_row(name):
    text = DOC.read_text()
    section = text.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
    for k in shaper_class(name).hparams:
        assert f"| `{k}` |" in section, f"{name}.{k} is not documented"
