"""The encoder as an ONNX Runtime graph: the CPU inference engine behind `--backend onnx`.

The Hugging Face model, with its pooling (attention-masked mean or CLS) and L2 normalisation inside the
graph, is exported once with torch's ONNX exporter, quantized for int8 with ONNX Runtime's own tool
(dynamic quantization, int8 weights with one scale per output channel), and kept in the encoder cache
under a name that hashes what defines it (the weights, torch and onnxruntime versions, precision,
pooling): a later start, a hot swap to the same encoder, or another process loads the file (~0.2 s)
instead of exporting (~3 s here).

Why ONNX Runtime: it is what CPU inference servers run. Its fused attention/GELU/LayerNorm kernels and
its lean per-call path computed a MiniLM query at batch 1 in 2.4 ms fp32 and 0.6 ms int8 on this 2-core
EPYC, against 5.2 ms for traced torch fp32 and 2.7 ms for traced torch bf16 (docs/cpu.md has the table).

A file is never served unless it computes the model's vectors: a new export is compared with the eager
torch model on probe texts (fp32 to 1e-4; int8 to a cosine bound), and the probe's output is stored in
the file and checked again at every load (a truncated or tampered file is re-exported, not served).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Bump when what an exported file holds, or how it is called, changes: older files are then ignored.
ONNX_FORMAT = 1
OPSET = 17
ONNX_DTYPES = ("float32", "int8")
DEFAULT_DTYPE = "int8"  # --dtype auto with the onnx backend; docs/cpu.md has the speed and quality figures
# Probe bounds: an fp32 export must reproduce the eager model (the same arithmetic, reordered); int8
# changes every weight, so it is held to the cosine of its vectors to fp32's instead (measured: mean
# 0.989, min 0.977 over 300 Home Depot queries).
FP32_ATOL = 1e-4
INT8_MIN_COSINE = 0.95
RELOAD_ATOL = 1e-4  # a cached file must give the probe vectors it gave when it was written


def available() -> bool:
    """Whether onnxruntime can be imported here."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def session_options(threads: int):
    """ONNX Runtime settings for one encoder session: every graph optimisation, `threads` intra-op
    threads, one inter-op thread, no spinning (the server runs several compute threads on few cores:
    a spinning pool would burn the core another batch needs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class OnnxGraph:
    """An ONNX Runtime session that maps (input_ids, attention_mask) int64 arrays to pooled vectors.

    `run` may be called from several threads at once (ONNX Runtime sessions are thread-safe); with one
    intra-op thread each call computes on its caller's thread, so compute threads run side by side."""

    def __init__(self, path: str | Path, threads: int) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.threads = threads
        self.session = ort.InferenceSession(str(self.path), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.meta = json.loads(meta.get("searchrec", "{}"))

    def run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def cache_key(digests: dict[str, str], dtype: str, pooling: str, normalize: bool) -> str:
    import onnxruntime
    import torch

    key = json.dumps({"format": ONNX_FORMAT, "opset": OPSET, "torch": torch.__version__,
                      "onnxruntime": onnxruntime.__version__, "dtype": dtype, "pooling": pooling,
                      "normalize": normalize, "files": digests}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _pooled_module(model, pooling: str, normalize: bool):
    import torch

    from common.encoding import pool_hidden

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return pool_hidden(hidden, attention_mask, pooling, normalize)

    return Pooled().eval()


def export(model, example: tuple, out: Path, pooling: str, normalize: bool) -> None:
    """Export the eager fp32 model with its pooling to `out` (dynamic batch and sequence axes)."""
    import torch

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape checks that hold for every input here
        # The TorchScript-based exporter (dynamo=False): it handles the Hugging Face BERT graph with
        # dynamic axes directly and needs no onnxscript.
        torch.onnx.export(_pooled_module(model, pooling, normalize), example, str(out),
                          input_names=["input_ids", "attention_mask"], output_names=["vectors"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "vectors": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantization: int8 weights per output channel for every MatMul (activations
    quantized per call). Per-channel kept vectors closer to fp32 (as with torch's quantizer)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    was, root.disabled = root.disabled, True  # its "consider pre-processing" notice on the root logger
    try:
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"])
    finally:
        root.disabled = was


def _attach_meta(path: Path, meta: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "searchrec", json.dumps(meta)
    onnx.save(model, str(path))


def build(model, probe: tuple[np.ndarray, np.ndarray], eager: np.ndarray, dtype: str, pooling: str,
          normalize: bool, path: Path, threads: int) -> OnnxGraph:
    """Export (and for int8 quantize) into `path`, check it against the eager vectors on the probe,
    store the probe's output in it, and return its session. Nothing is left under `path` if a check
    fails (RuntimeError)."""
    import torch

    if dtype not in ONNX_DTYPES:
        raise ValueError(f"the onnx backend runs {ONNX_DTYPES}, not {dtype!r}")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export(model, tuple(torch.from_numpy(a) for a in probe), fp32, pooling, normalize)
        made = fp32
        if dtype == "int8":
            made = Path(tmp) / "int8.onnx"
            quantize_int8(fp32, made)
        got = OnnxGraph(made, threads).run(*probe)
        if got.shape != eager.shape:
            raise RuntimeError(f"the exported encoder gives {got.shape} vectors for the probe, the model {eager.shape}")
        if dtype == "float32":
            err = float(np.abs(got - eager).max())
            if err > FP32_ATOL:
                raise RuntimeError(f"the exported fp32 encoder differs from the eager model by {err:.2e}")
        else:
            cos = float(_cosines(got, eager).min())
            if cos < INT8_MIN_COSINE:
                raise RuntimeError(f"the int8 encoder's probe vectors are at cosine {cos:.3f} of the model's "
                                   f"(bound {INT8_MIN_COSINE})")
        _attach_meta(made, {"format": ONNX_FORMAT, "dtype": dtype, "probe": got.tolist()})
        # Renamed into place: a crash mid-export leaves no half file under the final name.
        os.replace(made, path)
    from common.encoding import prune_cache

    graph = OnnxGraph(path, threads)
    prune_cache(path.parent, "encoder-*.onnx")  # the same least-recently-used rule as the traced graphs
    return graph


def load(path: Path, probe: tuple[np.ndarray, np.ndarray], threads: int) -> OnnxGraph:
    """A cached file's session, after checking it still gives the probe vectors stored in it (ValueError)."""
    graph = OnnxGraph(path, threads)
    if graph.meta.get("format") != ONNX_FORMAT or "probe" not in graph.meta:
        raise ValueError("it carries no searchrec probe")
    expected = np.asarray(graph.meta["probe"], dtype=np.float32)
    got = graph.run(*probe)
    if got.shape != expected.shape or not np.allclose(got, expected, atol=RELOAD_ATOL):
        raise ValueError("its probe vectors differ from the ones it was written with")
    os.utime(path)  # recently used: pruning keeps it
    return graph


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na, 1e-12)
