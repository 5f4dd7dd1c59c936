"""The shapers package is pure maths: no collectives, no DeepSpeed."""
import ast
import json
import pathlib
import subprocess
import sys

import megatron_shaping.shapers as shapers_pkg

PKG = pathlib.Path(shapers_pkg.__file__).parent
FORBIDDEN = ("torch.distributed", "deepspeed")


def test_importing_shapers_loads_no_distributed_code_of_ours_nor_deepspeed():
    code = ("import sys, json, megatron_shaping.shapers as s\n"
            "for name in s.REGISTRY: s.shaper_class(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('deepspeed', 'megatron_shaping')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.startswith("deepspeed")]
    assert not [m for m in loaded if m.startswith("megatron_shaping.integrations")]


def test_no_file_in_the_package_names_them():
    for path in sorted(PKG.glob("*.py")):
        text = path.read_text()
        for word in FORBIDDEN:
            assert word not in text, f"{path.name} contains {word!r}"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for m in mods:
                assert not m.startswith(("torch.distributed", "deepspeed", "megatron_shaping.integrations")), \
                    f"{path.name} imports {m}"
