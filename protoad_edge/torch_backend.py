"""The PyTorch network of a bundle behind the runtime's Backend interface (eager; FP16 on a GPU).

It lives outside ``protoad_edge.runtime`` because it needs torch, which camera images lack. It
is the yardstick the exported backends are compared with (``protoad-eval --compare``).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .build import resolve_device
from .bundle import load_torch_network
from .runtime.backend import Backend, check_batch


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, json_path: str | os.PathLike, device: str = "auto", fp16: bool | None = None) -> None:
        """``fp16=None``: half precision on CUDA (as deployed), FP32 on the CPU."""
        self.device = resolve_device(device)
        self.fp16 = self.device.type == "cuda" if fp16 is None else fp16
        self.net, self.info = load_torch_network(json_path, self.device)
        if self.fp16:
            # The L2 norm is written to stay finite in FP16, so the whole network can run in half.
            self.net.half()
        self.precision = "fp16" if self.fp16 else "fp32"

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(check_batch(batch, self.info)).to(self.device)
        maps, scores = self.net(x.half() if self.fp16 else x)
        return maps[:, 0].float().cpu().numpy(), scores.float().cpu().numpy()
