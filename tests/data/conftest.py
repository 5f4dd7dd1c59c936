import importlib
import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def load_tool(name):
    """The command-line tool ``tools/<name>.py`` as a module (to call its ``main(argv)``)."""
    return importlib.import_module(f"tools.{name}")


@pytest.fixture(scope="session")
def small_texts():
    """A few real documents (stdlib sources): enough text for a small BPE vocabulary."""
    names = ["textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "colorsys.py", "heapq.py", "keyword.py"]
    return [(STDLIB / n).read_text(encoding="utf-8") for n in names]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, small_texts):
    """Tokenizer + indexed dataset made through the CLI tools from .txt and .jsonl inputs."""
    import json
    d = tmp_path_factory.mktemp("corpus")
    txts = []
    for i, t in enumerate(small_texts[:4]):
        p = d / f"doc{i}.txt"
        p.write_text(t, encoding="utf-8")
        txts.append(str(p))
    jsonl = d / "rest.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(small_texts[4:])))
    model = d / "tok.model"
    load_tool("train_tokenizer").main(["--input", *txts, str(jsonl), "--output", str(model), "--vocab-size", "600"])
    prefix = d / "data_text_document"
    load_tool("preprocess_data").main(["--input", *txts, str(jsonl), "--tokenizer-model", str(model),
                                       "--output-prefix", str(prefix)])
    return {"dir": d, "model": model, "prefix": prefix, "inputs": txts + [str(jsonl)], "texts": small_texts}
