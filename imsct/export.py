"""Export of both networks to TorchScript and ONNX, and loading them back as drop-in networks
for the cascade (``Cascade(localiser=load_exported(...), segmenter=load_exported(...))``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .io import replace_atomically


def export_torchscript(net: torch.nn.Module, path: str | Path) -> Path:
    path = Path(path)
    scripted = torch.jit.script(net.eval())
    replace_atomically(path, lambda out: torch.jit.save(scripted, out))
    return path


def export_onnx(net: torch.nn.Module, path: str | Path, in_channels: int, example_shape=(64, 64, 32), opset: int = 17) -> Path:
    """ONNX graph with dynamic batch and spatial axes (each a multiple of 16)."""
    path = Path(path)
    x = torch.randn(1, in_channels, *example_shape)
    axes = {0: "batch", 2: "si", 3: "ap", 4: "rl"}
    replace_atomically(path, lambda out: torch.onnx.export(net.eval(), (x,), out, input_names=["image"], output_names=["logits"],
                                                           dynamic_axes={"image": axes, "logits": axes}, opset_version=opset, dynamo=False))
    return path


class OnnxNetwork(torch.nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` interface the cascade and MONAI's
    sliding-window inferer expect (tensor in, tensor out, on the CPU)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"image": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(np.asarray(out)).to(x.device)


def load_exported(path: str | Path) -> torch.nn.Module:
    """A TorchScript (``.ts``/``.pt``) or ONNX (``.onnx``) network, ready for the cascade."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxNetwork(path)
    return torch.jit.load(str(path), map_location="cpu").eval()


def export_models(models_dir: str | Path, out_dir: str | Path | None = None, formats=("torchscript", "onnx")) -> dict[str, Path]:
    """Export ``localiser.pt`` and ``model.pt`` of a models folder to ``.ts`` and/or ``.onnx``."""
    from .networks import localiser, tumour_network
    from .training import load_weights

    models_dir = Path(models_dir)
    out_dir = Path(out_dir or models_dir)
    written = {}
    for stem, factory, channels in (("localiser", localiser, 1), ("model", tumour_network, 2)):
        net = load_weights(factory(), models_dir / f"{stem}.pt").eval()
        if "torchscript" in formats:
            written[f"{stem}.ts"] = export_torchscript(net, out_dir / f"{stem}.ts")
        if "onnx" in formats:
            written[f"{stem}.onnx"] = export_onnx(net, out_dir / f"{stem}.onnx", channels)
    return written


def main(argv=None) -> int:
    import argparse
    import warnings

    ap = argparse.ArgumentParser(prog="python -m imsct.export", description="Export both networks to TorchScript and ONNX.",
                                 epilog="example: python -m imsct.export --models bundle/models")
    ap.add_argument("--models", default="bundle/models", help="folder with localiser.pt and model.pt")
    ap.add_argument("--out", default=None, help="output folder (default: the models folder)")
    ap.add_argument("--format", choices=["torchscript", "onnx", "both"], default="both")
    args = ap.parse_args(argv)
    formats = ("torchscript", "onnx") if args.format == "both" else (args.format,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, path in export_models(args.models, args.out, formats).items():
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
