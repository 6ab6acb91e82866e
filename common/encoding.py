"""The transformer text encoder and the device/dtype policy, shared by the server and the trainer.

Loads a Hugging Face encoder from a local folder (never from a hub), pools token states the way the
model was trained (MiniLM sentence-transformers: attention-masked mean, then L2) and returns float32
numpy vectors. Precision follows DESIGN.md: float16 on CUDA; bfloat16 autocast on CPUs with native
bf16 (AVX512-BF16/AMX); float32 otherwise, because emulated bf16 and fp16 are slower on CPU.
int8 (dynamic quantization of the linear layers) is a CPU opt-in that trades a little ranking
quality for query latency; see README "Performance".
"""
from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")


class DeviceError(RuntimeError):
    """The requested device or precision cannot be used on this machine."""


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of every Linear (weights int8 per output channel, activations
    quantized per call; fbgemm on x86). CPU only.

    Why: at batch 1 the encoder reads all its fp32 weights per query (memory-bound); int8 weights are
    4x smaller and the int8 GEMMs faster. Per-channel weight scales keep the vectors closer to fp32
    than per-tensor ones (cosine 0.977 vs 0.944 on Home Depot queries with MiniLM).
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that this API moves to torchao
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def resolve_device(requested: str) -> str:
    """Map auto|cpu|cuda to the device to use; asking for cuda without one is an error, not a fallback."""
    if requested not in DEVICES:
        raise DeviceError(f"device must be one of {DEVICES}, got {requested!r}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA device on this machine")
    return requested


def resolve_dtype(device: str, requested: str = "auto") -> str:
    """Pick the encoder precision for a device; refuse float16 on CPU (about 8x slower there)."""
    if requested not in DTYPES:
        raise DeviceError(f"dtype must be one of {DTYPES}, got {requested!r}")
    if requested == "auto":
        if device.startswith("cuda"):
            return "float16"
        return "bfloat16" if cpu_supports_bf16() else "float32"
    if requested == "float16" and not device.startswith("cuda"):
        raise DeviceError("float16 is only used on CUDA; on CPU choose bfloat16, float32 or int8")
    if requested == "int8" and device.startswith("cuda"):
        raise DeviceError("int8 (dynamic quantization) is a CPU option; on CUDA choose float16 or float32")
    return requested


class TextEncoder:
    """Encode texts into L2-normalised float32 vectors with a local Hugging Face model."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_length: int = 128,
        pooling: str = "mean",
        normalize: bool = True,
        trace: bool = False,
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model_dir = Path(model_dir)
        self.device = device
        self.dtype = dtype
        self.max_length = max_length
        self.pooling = pooling
        self.normalize = normalize
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self._tokenizer_lock = threading.Lock()
        # safetensors only: a pickled pytorch_model.bin is never loaded (no code runs from weight files).
        model = AutoModel.from_pretrained(self.model_dir, local_files_only=True, use_safetensors=True)
        model.eval()
        if dtype == "float16":
            model = model.half()  # CUDA only (resolve_dtype enforces it)
        if dtype == "int8":
            model = quantize_int8(model)
        self.model = model.to(device)
        self.dims = int(model.config.hidden_size)
        # Small batches pay ~8 ms of Python/module overhead per forward on this CPU (batch 1: 19 ms eager,
        # 13 ms traced, same outputs); a trace removes it. CPU fp32 and int8 only: autocast and fp16 are not traced.
        self.traced = self._trace() if trace and device == "cpu" and dtype in ("float32", "int8") else None

    def _trace(self):
        class _Hidden(torch.nn.Module):
            def __init__(self, model) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        example = self.tokenizer(["trace the encoder", "with a padded batch of two"], padding=True, return_tensors="pt")
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape checks that hold for every input here
            traced = torch.jit.trace(_Hidden(self.model), (example["input_ids"], example["attention_mask"]),
                                     check_trace=False, strict=False)
            return torch.jit.freeze(traced.eval())

    def _autocast(self):
        if self.dtype == "bfloat16":
            return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
        return torch.autocast(device_type="cpu", enabled=False)

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        # A fast tokenizer re-sets its padding/truncation state on every call, and a call on another
        # thread then fails with "Already borrowed" (huggingface/transformers#47085): one at a time.
        with self._tokenizer_lock:
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = batch.to(self.device)
        if self.traced is not None:
            hidden = self.traced(batch["input_ids"], batch["attention_mask"])
        else:
            with self._autocast():
                hidden = self.model(**batch).last_hidden_state
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, texts: list[str], batch_size: int = 64, progress=None) -> np.ndarray:
        """Encode texts in length-sorted batches (less padding); rows come back in input order."""
        out = np.empty((len(texts), self.dims), dtype=np.float32)
        if not texts:
            return out
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self._encode_batch([texts[i] for i in idx])
            if progress is not None:
                progress(len(idx))
        return out
