"""fp16 on DeepSpeed's CPU accelerator, for test workers.

DeepSpeed's CPU accelerator reports no fp16 support and refuses fp16 configs. Reporting it lets
DeepSpeed's real fp16 paths (loss scaler, FP16 optimizers, ZeRO unscale) run with CPU fp16
arithmetic. On another accelerator nothing is changed.
"""
import torch


def report_fp16_support() -> None:
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        return
    acc.is_fp16_supported = lambda: True
    acc.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]
