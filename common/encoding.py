"""The transformer text encoder and the device/dtype policy, shared by the server and the trainer.

Loads a Hugging Face encoder from a local folder (never from a hub), pools token states the way the
model was trained (MiniLM sentence-transformers: attention-masked mean, then L2) and returns float32
numpy vectors.

Precision (`resolve_dtype`, measured in docs/cpu.md): float16 on CUDA; on CPU, bfloat16 where the CPU
has native bf16 (AVX512-BF16/AMX), float32 otherwise. bfloat16 means the model's weights in bf16 (pooling
in fp32), TorchScript-traced on CPU like fp32: on an AMX Xeon at one torch thread that ran queries 1.3x
(batch 1) to 2.5x (batch 32) and catalog passages 2.4-3.3x faster than traced fp32, with vectors at
cosine >= 0.9999 to fp32's; untraced bf16 autocast, the earlier default there, ran at 0.43x traced fp32
at batch 1. Where bf16 is emulated it ran 1.7-5.6x slower than fp32: never the default there. int8
(dynamic quantization of the linear layers) is a CPU opt-in that trades vector fidelity (mean cosine
0.976 to fp32) for query latency; see docs/cpu.md.

A traced encoder can be kept in a graph cache (TorchScript files keyed by the weights, torch version
and precision): a later start loads the graph in ~0.1 s instead of importing the model code and tracing
(~5 s here), and never imports transformers' modeling code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from common.bundle_format import sha256_file
from common.cpu import cpu_supports_bf16

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "onnx")
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
TRACED_DTYPES = ("float32", "bfloat16", "int8")  # CPU precisions run as a TorchScript graph


class DeviceError(RuntimeError):
    """The requested device or precision cannot be used on this machine."""


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


def resolve_dtype(device: str, requested: str = "auto", backend: str = "torch") -> str:
    """Pick the encoder precision for a device; refuse float16 on CPU (about 8x slower there).

    auto: float16 on CUDA; with the onnx backend int8 (on any CPU kind); with torch on CPU bfloat16
    where `cpu_supports_bf16()` (SEARCHREC_CPU_BF16 or the CPU's flags), else float32. A malformed
    SEARCHREC_CPU_BF16 is an error whenever auto asks (whichever backend). One precision for every batch size: a query's vector, and so its
    answer, must not depend on which batch it shared (docs/cpu.md has the per-batch figures)."""
    if requested not in DTYPES:
        raise DeviceError(f"dtype must be one of {DTYPES}, got {requested!r}")
    native_bf16 = None
    if requested == "auto" and not device.startswith("cuda"):
        try:
            native_bf16 = cpu_supports_bf16()
        except ValueError as exc:  # a malformed SEARCHREC_CPU_BF16: a start-up error, not a guess
            raise DeviceError(str(exc)) from exc
    if backend == "onnx":
        from common.onnx_encoder import DEFAULT_DTYPE, ONNX_DTYPES

        if requested == "auto":
            return DEFAULT_DTYPE
        if requested not in ONNX_DTYPES:
            raise DeviceError(f"the onnx backend runs {' or '.join(ONNX_DTYPES)}, not {requested}")
        return requested
    if requested == "auto":
        if device.startswith("cuda"):
            return "float16"
        return "bfloat16" if native_bf16 else "float32"
    if requested == "float16" and not device.startswith("cuda"):
        raise DeviceError("float16 is only used on CUDA; on CPU choose bfloat16, float32 or int8")
    if requested == "int8" and device.startswith("cuda"):
        raise DeviceError("int8 (dynamic quantization) is a CPU option; on CUDA choose float16 or float32")
    return requested


def resolve_backend(device: str, requested: str = "auto", dtype: str = "auto") -> str:
    """Map auto|torch|onnx to the encoder's inference engine for a device and a requested precision.

    auto: ONNX Runtime on CPU (docs/cpu.md: the fastest engine there that keeps quality) unless the
    precision asked for is one only torch runs (bfloat16) or onnxruntime is not installed; torch on CUDA.
    Asking for onnx where it cannot run is an error, not a fallback."""
    from common import onnx_encoder

    if requested not in BACKENDS:
        raise DeviceError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        if device.startswith("cuda") or dtype in ("bfloat16", "float16") or not onnx_encoder.available():
            return "torch"
        return "onnx"
    if requested == "onnx":
        if device.startswith("cuda"):
            raise DeviceError("--backend onnx runs on the CPU; on CUDA the encoder runs in torch (float16)")
        if dtype not in ("auto", *onnx_encoder.ONNX_DTYPES):
            raise DeviceError(f"--backend onnx runs {' or '.join(onnx_encoder.ONNX_DTYPES)}, not {dtype}")
        if not onnx_encoder.available():
            raise DeviceError("--backend onnx needs onnxruntime (pip install -r requirements.txt)")
    return requested


# Bump when what a cached graph holds, or how it is called, changes: older files are then ignored.
GRAPH_FORMAT = 1
# Run through a cached graph when it is loaded and compared with what the eager model gave for them
# when the graph was traced: a file that does not compute the model's vectors is never served.
PROBE_TEXTS = ("graph cache probe: 20v cordless drill kit", "a padded batch of two")
PROBE_ATOL = 1e-4
GRAPH_CACHE_KEEP = 8  # graphs kept per cache folder (the most recently used); one per encoder and precision
# torch.onnx.export keeps global state (two at once fail: "GLOBALS.in_onnx_export must be False"), and two
# encoders of one process (in-process replicas, a swap while a classifier loads) would export the same
# file twice: one at a time, and the second finds the first's file in the cache.
_ONNX_LOCK = threading.Lock()


def prune_cache(folder: Path, pattern: str) -> None:
    """Delete the files of `pattern` in `folder` beyond the GRAPH_CACHE_KEEP most recently used (by mtime)."""
    kept = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[GRAPH_CACHE_KEEP:]:
        old.unlink(missing_ok=True)


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """Sentence vectors from the last hidden states, in fp32: attention-masked mean or CLS, optionally L2
    normalised. The eager encoder and the ONNX export (which puts it inside the graph) both use this."""
    hidden = hidden.float()
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled


def weight_digests(model_dir: str | Path) -> dict[str, str]:
    """sha256 of the files that define the encoder's computation (its config and weights)."""
    return {name: sha256_file(Path(model_dir) / name) for name in ("config.json", "model.safetensors")}


def load_tokenizer(model_dir: str | Path, max_length: int):
    """The model's tokenizer, set to pad to the longest text and truncate at max_length tokens.

    With a tokenizer.json (every fast tokenizer) this is the `tokenizers` object itself, configured the
    way transformers configures it for `tokenizer(texts, padding=True, truncation=True,
    max_length=...)` -- the same ids (tested) without importing transformers (~2 s of the server's
    start). Without one, transformers' AutoTokenizer.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    conf_path = model_dir / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    pad = conf.get("pad_token") or "[PAD]"
    pad = pad.get("content") if isinstance(pad, dict) else pad  # older configs hold an AddedToken dict
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise ValueError(f"{model_dir}: pad token {pad!r} is not in the tokenizer's vocabulary")
    tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction=conf.get("truncation_side", "right"))
    tok.enable_padding(direction=conf.get("padding_side", "right"), pad_id=pad_id,
                       pad_type_id=int(conf.get("pad_token_type_id", 0)), pad_token=pad)
    return tok


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
        graph_cache: str | Path | None = None,
        digests: dict[str, str] | None = None,
        backend: str = "torch",
        threads: int | None = None,
    ) -> None:
        """`graph_cache`: a folder where traced graphs (and ONNX exports) are kept and looked up (None =
        trace/export every time). `digests`: the sha256 of config.json and model.safetensors when the
        caller has verified them already (a bundle's manifest); otherwise they are computed from the
        files (~0.2 s). `backend`: torch (eager or traced) or onnx (ONNX Runtime, CPU, float32/int8;
        `threads` intra-op threads per call, default torch's current setting)."""
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model_dir = Path(model_dir)
        self.device = device
        self.dtype = dtype
        self.max_length = max_length
        self.pooling = pooling
        self.normalize = normalize
        self.tokenizer = load_tokenizer(self.model_dir, max_length)
        self._tokenizer_lock = threading.Lock()
        self.dims = int(json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))["hidden_size"])
        self._model: torch.nn.Module | None = None
        self.graph_source = "none"  # none | traced | cache: where self.traced came from
        # Small batches pay ~8 ms of Python/module overhead per forward on this CPU (batch 1: 19 ms eager,
        # 13 ms traced, same outputs); a trace removes it. On CPU only (fp32, bf16, int8): CUDA runs eagerly.
        self.traced = None
        self.backend = backend
        self.onnx = None  # an OnnxGraph with backend onnx
        if backend == "onnx":
            if device != "cpu":
                raise DeviceError("the onnx backend runs on the CPU")
            self.onnx = self._onnx_graph(graph_cache, digests, threads or torch.get_num_threads())
        elif trace and device == "cpu" and dtype in TRACED_DTYPES:
            self.traced = self._graph(graph_cache, digests)
        else:
            self._model = self._load_model()

    @property
    def model(self) -> torch.nn.Module:
        """The eager model (loaded on first use when the encoder runs a cached graph)."""
        if self._model is None:
            self._model = self._load_model()
        return self._model

    def _load_model(self, dtype: str | None = None) -> torch.nn.Module:
        """The eager model in `dtype` (default: the encoder's precision)."""
        from transformers import AutoModel

        dtype = dtype or self.dtype
        # safetensors only: a pickled pytorch_model.bin is never loaded (no code runs from weight files).
        model = AutoModel.from_pretrained(self.model_dir, local_files_only=True, use_safetensors=True)
        model.eval()
        if int(model.config.hidden_size) != self.dims:
            raise ValueError(f"{self.model_dir}: model has {model.config.hidden_size}-d states, config.json {self.dims}")
        if dtype == "float16":
            model = model.half()  # CUDA only (resolve_dtype enforces it)
        if dtype == "bfloat16":
            # Weights and activations in bf16, pooling in fp32 (_pool): the same math traced or eager, so a
            # cached graph can be checked against the eager model. Faster than autocast, which converts the
            # fp32 weights at every call (docs/cpu.md).
            model = model.to(torch.bfloat16)
        if dtype == "int8":
            model = quantize_int8(model)
        return model.to(self.device)

    def _tokenize(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        # A transformers fast tokenizer re-sets its padding/truncation state on every call, and a call on
        # another thread then fails with "Already borrowed" (huggingface/transformers#47085): one at a time.
        with self._tokenizer_lock:
            if isinstance(self.tokenizer, Tokenizer):
                found = self.tokenizer.encode_batch(list(texts))
                ids = torch.tensor([e.ids for e in found], dtype=torch.long)
                mask = torch.tensor([e.attention_mask for e in found], dtype=torch.long)
            else:
                batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                       return_tensors="pt")
                ids, mask = batch["input_ids"], batch["attention_mask"]
        return ids.to(self.device), mask.to(self.device)

    def _tokenize_np(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """int64 id and mask arrays (ONNX Runtime's inputs; no torch tensor on the way)."""
        if not isinstance(self.tokenizer, Tokenizer):
            ids, mask = self._tokenize(texts)
            return ids.cpu().numpy(), mask.cpu().numpy()
        with self._tokenizer_lock:
            found = self.tokenizer.encode_batch(list(texts))
        return (np.array([e.ids for e in found], dtype=np.int64),
                np.array([e.attention_mask for e in found], dtype=np.int64))

    def _onnx_graph(self, cache: str | Path | None, digests: dict[str, str] | None, threads: int):
        """The ONNX Runtime session: from the cache when a valid file is there, else exported (and cached)."""
        with _ONNX_LOCK:
            return self._onnx_graph_locked(cache, digests, threads)

    def _onnx_graph_locked(self, cache: str | Path | None, digests: dict[str, str] | None, threads: int):
        from common import onnx_encoder

        probe = self._tokenize_np(PROBE_TEXTS)
        key = onnx_encoder.cache_key(digests or weight_digests(self.model_dir), self.dtype, self.pooling, self.normalize)
        if cache is not None:
            path = Path(cache) / f"encoder-{key}.onnx"
            if path.is_file():
                try:
                    graph = onnx_encoder.load(path, probe, threads)
                    self.graph_source = "cache"
                    log.info("encoder ONNX graph (%s) loaded from cache %s", self.dtype, path)
                    return graph
                except Exception as exc:  # onnxruntime raises its own types for a bad file
                    log.warning("encoder ONNX cache %s is unusable (%s); exporting the model again", path, exc)
        # Exported from the fp32 model whatever the precision (int8 is quantized from the fp32 graph),
        # and checked against its vectors.
        model = self._load_model("float32")
        with torch.inference_mode():
            ids, mask = (torch.from_numpy(a) for a in probe)
            eager = self._pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        args = (model, probe, eager, self.dtype, self.pooling, self.normalize)
        self.graph_source = "exported"
        if cache is not None:
            try:
                graph = onnx_encoder.build(*args, path, threads)
                log.info("encoder exported to ONNX (%s) and cached in %s", self.dtype, path)
                return graph
            except OSError as exc:  # a read-only or full cache costs the next start an export, nothing more
                log.warning("encoder ONNX graph not cached (%s: %s)", type(exc).__name__, exc)
        # No cache: the session holds the model once created, so the file goes with its folder.
        with tempfile.TemporaryDirectory(prefix="searchrec-onnx-") as tmp:
            return onnx_encoder.build(*args, Path(tmp) / f"encoder-{key}.onnx", threads)

    def _trace(self):
        class _Hidden(torch.nn.Module):
            def __init__(self, model) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        example = self._tokenize(["trace the encoder", "with a padded batch of two"])
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape checks that hold for every input here
            traced = torch.jit.trace(_Hidden(self.model), example, check_trace=False, strict=False)
            return torch.jit.freeze(traced.eval())

    def _graph(self, cache: str | Path | None, digests: dict[str, str] | None):
        """The traced graph: from the cache when a valid one is there, else traced (and then cached)."""
        if cache is None:
            self.graph_source = "traced"
            return self._trace()
        key = json.dumps({"format": GRAPH_FORMAT, "torch": torch.__version__, "device": self.device,
                          "dtype": self.dtype, "files": digests or weight_digests(self.model_dir)}, sort_keys=True)
        path = Path(cache) / f"encoder-{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"
        if path.is_file():
            try:
                graph = self._load_graph(path)
                self.graph_source = "cache"
                os.utime(path)  # recently used: pruning keeps it
                log.info("encoder graph loaded from cache %s", path)
                return graph
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                log.warning("encoder graph cache %s is unusable (%s); tracing the model again", path, exc)
        graph = self._trace()
        self.graph_source = "traced"
        try:
            self._save_graph(graph, path)
            log.info("encoder graph traced and cached in %s", path)
        except (RuntimeError, OSError) as exc:  # a read-only or full disk costs the next start a trace, nothing more
            log.warning("encoder graph not cached (%s: %s)", type(exc).__name__, exc)
        return graph

    def _probe(self, forward) -> np.ndarray:
        ids, mask = self._tokenize(PROBE_TEXTS)
        with torch.inference_mode():
            return self._pool(forward(ids, mask), mask)

    def _load_graph(self, path: Path):
        extra = {"searchrec.json": ""}
        graph = torch.jit.load(str(path), map_location=self.device, _extra_files=extra)
        meta = json.loads(extra["searchrec.json"])
        expected = np.asarray(meta["probe"], dtype=np.float32)
        got = self._probe(graph)
        if got.shape != expected.shape:
            raise ValueError(f"its probe vectors differ from the model's in shape ({got.shape} vs {expected.shape})")
        if not np.allclose(got, expected, atol=PROBE_ATOL):
            raise ValueError(f"its probe vectors differ from the model's by up to {np.abs(got - expected).max():.2e}")
        return graph

    def _save_graph(self, graph, path: Path) -> None:
        eager = self._probe(lambda ids, mask: self.model(input_ids=ids, attention_mask=mask).last_hidden_state)
        traced = self._probe(graph)
        if not np.allclose(traced, eager, atol=PROBE_ATOL):  # never cache a graph that disagrees with the model
            raise RuntimeError(f"traced graph differs from the eager model by {np.abs(traced - eager).max():.2e}")
        meta = {"format": GRAPH_FORMAT, "torch": torch.__version__, "dtype": self.dtype, "probe": eager.tolist()}
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Written beside its final name and renamed: a crash mid-write leaves no half file under that name.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".encoder-", suffix=".tmp")
        os.close(fd)
        try:
            torch.jit.save(graph, tmp, _extra_files={"searchrec.json": json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        # One ~90 MB file per encoder and precision: a server that swaps in many fine-tuned bundles would
        # otherwise fill the disk. The least recently used beyond GRAPH_CACHE_KEEP go.
        prune_cache(path.parent, "encoder-*.pt")

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        pooled = pool_hidden(hidden, mask, self.pooling, self.normalize)
        return pooled.cpu().numpy().astype(np.float32, copy=False)

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        if self.onnx is not None:
            if self.dtype == "int8":
                # Dynamic quantization scales activations per call, over the whole batch (padding
                # included): one text per call keeps a query's vector, and so its answer, independent of
                # which batch it shared. It costs nothing measurable here (0.48 ms a query alone, 0.44
                # inside a padded batch of 32), and no padding is computed.
                return np.concatenate([self.onnx.run(*self._tokenize_np([t])) for t in texts])
            return self.onnx.run(*self._tokenize_np(texts))
        ids, mask = self._tokenize(texts)
        if self.traced is not None:
            hidden = self.traced(ids, mask)
        else:
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return self._pool(hidden, mask)

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
