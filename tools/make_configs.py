#!/usr/bin/env python
"""Generate configs/deepspeed/*.json: ZeRO stage {1,2,3} x {bf16,fp16} x {each shaper, none}.

    python tools/make_configs.py            # rewrite configs/deepspeed/
    python tools/make_configs.py --check    # exit 1 if the files differ from what this writes

One script, so that the 54 files differ only where they should. Choices made here:
- ``gradient_clipping`` is 0 when a shaper is on: the shaper is then the only gradient treatment
  and methods compare cleanly (DeepSpeed would otherwise clip at its default 1.0 after shaping);
  the ``none`` baselines clip at 1.0, the usual LLM practice.
- AdamW with LLaMA's betas (0.9, 0.95), eps 1e-8 and weight decay 0.1 (Touvron et al. 2023);
  ``lr`` is a placeholder that launch/pretrain.py overrides with --lr.
- Batch sizes are placeholders too: pretrain.py sets them from --micro-batch-size and
  --global-batch-size.
- One config per method of the shaper registry (``megatron_shaping.shapers.REGISTRY``), with the
  method's default granularity and every hyperparameter at its default, as its class declares
  them (docs/SHAPERS.md gives the sources); every section is validated before it is written.
"""
import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "configs" / "deepspeed"

from megatron_shaping.shapers import REGISTRY, build_shaper, default_section  # noqa: E402

STAGES = (1, 2, 3)
PRECISIONS = {
    "bf16": {"bf16": {"enabled": True}},
    "fp16": {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}},
}


def shaping_section(kind: str):
    if kind == "none":
        return None
    return default_section(kind)


def make_config(stage: int, precision: str, kind: str) -> dict:
    name = f"zero{stage}_{precision}_{kind}"
    cfg = {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0 if kind == "none" else 0.0,
        "optimizer": {"type": "AdamW",
                      "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
        **PRECISIONS[precision],
        "zero_optimization": {"stage": stage, "contiguous_gradients": True, "overlap_comm": False,
                              "reduce_bucket_size": 50_000_000},
        "csv_monitor": {"enabled": True, "output_path": "runs/monitor/", "job_name": name},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    section = shaping_section(kind)
    if section is not None:
        # Global shaping tags every 10 steps next to DeepSpeed's own (per-layer tags would write
        # six CSV files per tensor: turn log_per_layer on for a closer look), and the spike log.
        section.update({"log_interval": 10, "log_per_layer": False,
                        "spike_log": f"runs/monitor/{name}/spikes.jsonl"})
        cfg["gradient_shaping"] = section
    return cfg


def all_configs():
    for stage in STAGES:
        for precision in PRECISIONS:
            for kind in list(REGISTRY) + ["none"]:
                yield f"zero{stage}_{precision}_{kind}.json", make_config(stage, precision, kind)


def validate(cfg: dict):
    if "gradient_shaping" in cfg:
        s = cfg["gradient_shaping"]
        build_shaper(s["type"], s["params"])


def render(cfg: dict) -> str:
    return json.dumps(cfg, indent=2) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    out = Path(args.out)
    stale = []
    for name, cfg in all_configs():
        validate(cfg)
        text = render(cfg)
        path = out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check:
        expected = {n for n, _ in all_configs()}
        extra = sorted(f.name for f in out.glob("*.json") if f.name not in expected)
        if stale or extra:
            print(f"configs/deepspeed is out of date: differing {stale}, unexpected {extra}; "
                  f"run python tools/make_configs.py")
            return 1
        print(f"{len(expected)} configs up to date")
        return 0
    print(f"wrote {sum(1 for _ in all_configs())} configs to {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
