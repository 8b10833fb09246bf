"""The one table of model files: which networks IMSCT ships, how each is built, loaded, saved and exported.

Every front door (command line, bundle, MONAI Label app, continual learning, scripts) asks this
module for a model by its key; no other file spells a weights file name.

=================  ===================  =====  ==========  ==============================================
key                file                 stage  inputs      outputs
=================  ===================  =====  ==========  ==============================================
``localiser``      ``localiser.pt``     1      T2w         cord region
``tumor``          ``model.pt``         2      T2w, T1w    tumour, edema, cavity, whole tumour
``tumor_t2only``   ``model_t2only.pt``  2      T2w, zeros  tumour, edema, cavity, whole tumour
``anatomy``        ``anatomy.pt``       3      T2w         tight spinal cord, intervertebral discs
``clicks``         ``clicks.pt``        2      T2w, T1w,   tumour, edema, cavity, whole tumour
                                               4 clicks    (interactive correction, :mod:`imsct.clicks`)
=================  ===================  =====  ==========  ==============================================

Weights are float16 state dicts (half the size), loaded back as float32 on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .io import InputError, replace_atomically
from .labels import ANATOMY_CHANNELS, STAGE2_CHANNELS

if TYPE_CHECKING:  # torch loads only when a network is built: `imsct --help` and input checks stay fast
    import torch

DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "bundle" / "models"


@dataclass(frozen=True)
class ModelFile:
    key: str
    filename: str
    stage: int
    inputs: tuple[str, ...]  # channel names, in order
    outputs: tuple[str, ...]
    build: Callable[[], torch.nn.Module]
    description: str

    @property
    def stem(self) -> str:
        return self.filename.rsplit(".", 1)[0]

    @property
    def in_channels(self) -> int:
        return len(self.inputs)

    def path(self, models_dir: str | Path | None = None) -> Path:
        return Path(models_dir or DEFAULT_MODELS_DIR) / self.filename


def _localiser() -> torch.nn.Module:
    from .networks import localiser

    return localiser()


def _tumor() -> torch.nn.Module:
    from .networks import tumor_network

    return tumor_network()


def _anatomy() -> torch.nn.Module:
    from .networks import anatomy_network

    return anatomy_network()


def _clicks() -> torch.nn.Module:
    from .networks import click_network

    return click_network()


MODELS: dict[str, ModelFile] = {m.key: m for m in (
    ModelFile("localiser", "localiser.pt", 1, ("T2w",), ("cord",), _localiser,
              "stage 1: spinal cord region on the T2w (8 base filters)"),
    ModelFile("tumor", "model.pt", 2, ("T2w", "T1w"), STAGE2_CHANNELS, _tumor,
              "stage 2: tumour, edema, cavity, whole tumour from T2w + Gd-T1w (16 base filters)"),
    ModelFile("tumor_t2only", "model_t2only.pt", 2, ("T2w", "T1w (always zero)"), STAGE2_CHANNELS, _tumor,
              "stage 2 without the T1w: fine-tuned from 'tumor' with the T1w channel zeroed"),
    ModelFile("anatomy", "anatomy.pt", 3, ("T2w",), ANATOMY_CHANNELS, _anatomy,
              "stage 3: tight spinal cord and intervertebral discs on stage 2's box (8 base filters): "
              "the cord mask and vertebral levels"),
    ModelFile("clicks", "clicks.pt", 2, ("T2w", "T1w", "clicks tumor", "clicks edema", "clicks cavity", "clicks background"),
              STAGE2_CHANNELS, _clicks,
              "interactive correction (DeepEdit-style): stage 2 with click maps, first convolution widened from 'tumor' "
              "(imsct.clicks)"),
)}

# the models a cascade needs, per mode
CASCADE_MODELS = {False: ("localiser", "tumor"), True: ("localiser", "tumor_t2only")}
OPTIONAL_MODELS = ("anatomy",)  # used when their file is in the models folder (cord mask and levels)


def cascade_keys(t2_only: bool, models_dir: str | Path | None = None) -> tuple[str, ...]:
    """The models a cascade of ``models_dir`` runs: the required pair of its mode and the optional
    ones present there."""
    return (*CASCADE_MODELS[bool(t2_only)], *(k for k in OPTIONAL_MODELS if path(k, models_dir).is_file()))


def spec(key: str) -> ModelFile:
    try:
        return MODELS[key]
    except KeyError:
        hint = f" (renamed {key.replace('tumour', 'tumor')!r}, the spelling of its label)" if "tumour" in key else ""
        raise KeyError(f"unknown model {key!r}{hint}; known: {', '.join(MODELS)}") from None


def stage_model(stage: int, t2_only: bool = False) -> ModelFile:
    """The model a training stage produces (1: localiser, 2: the tumour network, or its T2w-only
    variant, 3: the anatomy network)."""
    if stage not in (1, 2, 3):
        raise ValueError(f"stage {stage}: expected 1, 2 or 3")
    if stage == 3:
        return MODELS["anatomy"]
    return MODELS["localiser" if stage == 1 else ("tumor_t2only" if t2_only else "tumor")]


def path(key: str, models_dir: str | Path | None = None) -> Path:
    """Where model ``key`` lives in ``models_dir`` (default: the shipped ``bundle/models``)."""
    return spec(key).path(models_dir)


def checksum(key: str, models_dir: str | Path | None = None) -> str:
    """SHA-256 (hex) of model ``key``'s weights file: what provenance records and caches key on."""
    import hashlib

    h = hashlib.sha256()
    with open(path(key, models_dir), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record(keys, models_dir: str | Path | None = None) -> dict[str, dict[str, str]]:
    """``{file name: {"model": key, "sha256": ...}}`` for the models ``keys``: the provenance of outputs."""
    return {spec(k).filename: {"model": k, "sha256": checksum(k, models_dir)} for k in keys}


def build(key: str) -> torch.nn.Module:
    """A freshly initialised network for model ``key`` (the architecture every config uses)."""
    return spec(key).build()


def save_weights(net: torch.nn.Module, path: str | Path) -> None:
    """Save a state dict in float16 (half the size; loaded back as float32), atomically."""
    import torch

    state = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    replace_atomically(path, lambda out: torch.save(state, out))


def load_weights(net: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a state dict saved by :func:`save_weights` on any device (CPU-safe)."""
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    net.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    return net


def check_present(keys, models_dir: str | Path | None = None) -> Path:
    """The models folder, after checking that it holds the files of ``keys`` (InputError naming the first missing)."""
    folder = Path(models_dir or DEFAULT_MODELS_DIR)
    if not folder.is_dir():
        raise InputError(f"models folder {folder}: not found")
    for key in keys:
        if not path(key, folder).is_file():
            raise InputError(f"models folder {folder}: {spec(key).filename} not found")
    return folder


def load(key: str, models_dir: str | Path | None = None, file: str | Path | None = None) -> torch.nn.Module:
    """Model ``key`` with its weights from ``models_dir`` (or from ``file``, e.g. a training ``best.pt``), in eval mode."""
    if file is None:
        check_present([key], models_dir)
        file = path(key, models_dir)
    return load_weights(build(key), file).eval()


# ---- export: TorchScript and ONNX of every model in the table ------------------------------------

EXPORT_SUFFIX = {"torchscript": ".ts", "onnx": ".onnx"}


def exported_path(key: str, models_dir: str | Path | None, backend: str) -> Path:
    """Where the ``backend`` ("torchscript" or "onnx") export of model ``key`` lives."""
    return Path(models_dir or DEFAULT_MODELS_DIR) / (spec(key).stem + EXPORT_SUFFIX[backend])


def export_torchscript(net: torch.nn.Module, path: str | Path) -> Path:
    import torch

    path = Path(path)
    scripted = torch.jit.script(net.eval())
    replace_atomically(path, lambda out: torch.jit.save(scripted, out))
    return path


def export_onnx(net: torch.nn.Module, path: str | Path, in_channels: int, example_shape=(64, 64, 32), opset: int = 17) -> Path:
    """ONNX graph with dynamic batch and spatial axes (each a multiple of 16). A network that takes
    the validity channel (:mod:`imsct.windows`) is exported with it: ``in_channels + 1`` inputs."""
    import torch

    from .windows import accepts_validity

    path = Path(path)
    x = torch.randn(1, in_channels + int(accepts_validity(net)), *example_shape)
    if accepts_validity(net):
        x[:, -1] = 1.0
    axes = {0: "batch", 2: "si", 3: "ap", 4: "rl"}
    replace_atomically(path, lambda out: torch.onnx.export(net.eval(), (x,), out, input_names=["image"], output_names=["logits"],
                                                           dynamic_axes={"image": axes, "logits": axes}, opset_version=opset, dynamo=False))
    return path


def export_models(models_dir: str | Path | None = None, out_dir: str | Path | None = None, formats=("torchscript", "onnx"),
                  keys=None) -> dict[str, Path]:
    """Export the models of ``models_dir`` (every model of the table present there, or ``keys``) to
    ``.ts`` and/or ``.onnx`` in ``out_dir`` (default: the models folder)."""
    models_dir = Path(models_dir or DEFAULT_MODELS_DIR)
    out_dir = Path(out_dir or models_dir)
    keys = list(keys) if keys else [k for k in MODELS if path(k, models_dir).is_file()]
    if not keys:
        raise InputError(f"models folder {models_dir}: none of {', '.join(m.filename for m in MODELS.values())} found")
    written = {}
    for key in keys:
        m = spec(key)
        net = load(key, models_dir)
        if "torchscript" in formats:
            written[f"{m.stem}.ts"] = export_torchscript(net, exported_path(key, out_dir, "torchscript"))
        if "onnx" in formats:
            written[f"{m.stem}.onnx"] = export_onnx(net, exported_path(key, out_dir, "onnx"), m.in_channels)
    return written


def onnx_network(path: str | Path, threads: int | None = None, image_channels: int | None = None) -> "torch.nn.Module":
    """An ONNX Runtime session behind the ``nn.Module`` interface the cascade and MONAI's
    sliding-window inferer expect (tensor in, tensor out, on the CPU). A graph with one input
    channel more than ``image_channels`` takes the validity channel (:mod:`imsct.windows`)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    class OnnxNetwork(torch.nn.Module):
        def __init__(self):
            super().__init__()
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = int(threads)
            self.path = str(path)
            self.session = ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
            channels = self.session.get_inputs()[0].shape[1]
            self.accepts_validity = image_channels is not None and channels == image_channels + 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.session.run(None, {"image": x.detach().float().cpu().numpy()})[0]
            return torch.from_numpy(np.asarray(out)).to(x.device)

    return OnnxNetwork()


def load_exported(path: str | Path, image_channels: int | None = None) -> torch.nn.Module:
    """A TorchScript (``.ts``/``.pt``) or ONNX (``.onnx``) network, ready for the cascade."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"exported model {path}: not found (write it with 'imsct export')")
    if path.suffix == ".onnx":
        return onnx_network(path, image_channels=image_channels)
    import torch

    return torch.jit.load(str(path), map_location="cpu").eval()


BACKENDS = ("eager", "torchscript", "onnx", "openvino")


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def auto_backend(device: str | torch.device = "cpu") -> str:
    """The fastest accurate backend on ``device``: OpenVINO on a CPU (where installed; 2-2.5x eager
    PyTorch in float32 on AVX2, about 4x eager bfloat16 autocast on AVX512-BF16/AMX, same held-out
    Dice: README, "Performance"), eager PyTorch elsewhere (GPUs)."""
    kind = str(device).split(":")[0]
    return "openvino" if kind == "cpu" and openvino_available() else "eager"


def _cache_dir() -> Path:
    import os

    base = os.environ.get("IMSCT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imsct"
    return Path(base)


ONNX_GRAPH_FORMAT = "validity"  # graphs of stage 2 take the validity channel (a cache name part: older graphs are not reused)


def onnx_source(key: str, models_dir: str | Path | None = None) -> Path:
    """An ONNX graph of model ``key``'s current weights: the export beside them when it is newer than
    the weights, else one made once into the user cache, named by the weights' SHA-256."""

    weights_file = path(key, models_dir)
    beside = exported_path(key, models_dir, "onnx")
    if beside.is_file() and beside.stat().st_mtime >= weights_file.stat().st_mtime:
        return beside
    digest = checksum(key, models_dir)[:16]
    cached = _cache_dir() / "onnx" / f"{spec(key).stem}-{digest}-{ONNX_GRAPH_FORMAT}.onnx"
    if not cached.is_file():
        import warnings

        cached.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(load(key, models_dir), cached, spec(key).in_channels)
    return cached


def openvino_network(onnx_path: str | Path, bf16: bool = False, threads: int | None = None,
                     image_channels: int | None = None) -> "torch.nn.Module":
    """An OpenVINO CPU inference of an ONNX graph behind the ``nn.Module`` interface (tensor in,
    tensor out), in float32 or, with ``bf16``, bfloat16 (native only on AVX512-BF16/AMX CPUs)."""
    import numpy as np
    import openvino as ov
    import torch

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
              "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)

    class OpenVinoNetwork(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.path, self.bf16 = str(onnx_path), bool(bf16)
            channels = compiled.input(0).get_partial_shape()[1]
            self.accepts_validity = (image_channels is not None and channels.is_static
                                     and channels.get_length() == image_channels + 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = compiled(np.ascontiguousarray(x.detach().float().cpu().numpy()))[0]
            return torch.from_numpy(np.asarray(out)).to(x.device)

    return OpenVinoNetwork()


def load_backend(key: str, models_dir: str | Path | None = None, backend: str = "eager", bf16: bool = False) -> torch.nn.Module:
    """Model ``key`` run by ``backend``: "eager" (PyTorch), "torchscript" or "onnx" (the export
    beside the weights), or "openvino" (from the ONNX graph, float32 or ``bf16``)."""
    if backend == "eager":
        return load(key, models_dir)
    if backend == "openvino":
        check_present([key], models_dir)
        return openvino_network(onnx_source(key, models_dir), bf16=bf16, image_channels=spec(key).in_channels)
    if backend not in EXPORT_SUFFIX:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return load_exported(exported_path(key, models_dir, backend), image_channels=spec(key).in_channels)


__all__ = ["MODELS", "ModelFile", "CASCADE_MODELS", "DEFAULT_MODELS_DIR", "spec", "stage_model", "path", "build", "load",
           "load_weights", "save_weights", "check_present", "export_models", "export_torchscript", "export_onnx",
           "exported_path", "load_exported", "load_backend", "onnx_network", "openvino_network", "auto_backend", "BACKENDS"]
