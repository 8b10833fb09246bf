"""Speed and memory of the pipeline on a paper-sized case, side by side (not a test).

    python scripts/benchmark.py [--repeats 3] [--threads N] [--skip-server]

Generates one two-contrast phantom of the paper's size (545 x 545 x 20 voxels: 0.5 mm in-plane,
3 mm sagittal slices; the T1w on its own 0.6 mm grid), then, each configuration in a fresh
process (so that peak memory is its own):

- end to end (load, resample, localise, crop + segment, post-process, save) per stage, for the
  eager PyTorch networks at the defaults of inference.json (bfloat16 autocast where the CPU runs it
  natively, localiser field fitted to the image), eager float32 on the full 512x256x32 localiser
  field (the earlier default), TorchScript and ONNX Runtime (float32);
- the cascade against one network over the whole field (no localiser) on the same case;
- with the MONAI Label app: ``/infer/cascade`` latency and ``/activelearning`` latency per strategy.

Reports the median of ``--repeats`` runs after one warm-up run (the first call of a process also
pays for thread pools and kernels; its time is printed as "cold"). The last line is machine-readable:
``end_to_end_s=X cascade_speedup=Y peak_rss_gib=Z next_sample_ms=W``: the default pipeline (the
first backend, eager) end to end, its speed-up over the whole-field pipeline, its peak RSS, and the
slowest warm ``/activelearning`` strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("load", "resample", "localise", "segment", "postprocess", "save")


def conv_flops(net, shape) -> float:
    """Multiply-adds x 2 of every 3D convolution in one forward pass of ``net`` on an input of ``shape``."""
    import torch

    total = [0.0]

    def hook(m, inp, out):
        k = m.kernel_size[0] * m.kernel_size[1] * m.kernel_size[2]
        total[0] += 2.0 * out.numel() * (m.in_channels // m.groups) * k

    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    try:
        with torch.no_grad():
            net(torch.zeros(shape))
    finally:
        for h in hs:
            h.remove()
    return total[0]


def machine_conv_gflops(repeats: int = 5) -> float:
    """This machine's float32 3D-convolution throughput (GFLOP/s): a 32 -> 32 channel 3x3x3
    convolution on a 64 x 64 x 32 volume, the U-Nets' most common layer, best of ``repeats``."""
    import torch

    conv = torch.nn.Conv3d(32, 32, 3, padding=1, bias=False).eval()
    x = torch.randn(1, 32, 64, 64, 32)
    flops = 2.0 * 32 * 32 * 27 * 64 * 64 * 32
    best = float("inf")
    with torch.no_grad():
        conv(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def make_case(out: Path, seed: int = 7) -> tuple[Path, Path]:
    """A phantom acquired like the paper's median case: 545 x 545 x 20 T2w, T1w on its own grid."""
    import numpy as np

    from imsct.phantoms.anatomy import random_spec
    from imsct.phantoms.render import Acquisition, corrupt, nifti, render_labels_and_tissue

    t2p, t1p = out / "sub-paper_T2w.nii.gz", out / "sub-paper_T1w.nii.gz"
    if t2p.exists() and t1p.exists():
        return t2p, t1p
    import nibabel as nib

    rng = np.random.default_rng(seed)
    spec = random_spec(rng, "astrocytoma")
    z = spec.lesions[0].z
    centre = spec.centreline(np.array([z]))[0].astype(np.float64)
    acq2 = Acquisition(res_ip=0.5, thickness=3.0, fov_si=272.5, fov_ap=272.5, n_slices=20, centre=centre, axcodes=("P", "I", "R"))
    acq1 = Acquisition(res_ip=0.6, thickness=3.0, fov_si=260.0, fov_ap=260.0, n_slices=20, centre=centre + np.array([1.0, 2.0, -3.0]),
                       axcodes=("P", "I", "R"))
    images = []
    for acq, which in ((acq2, 0), (acq1, 1)):
        shape, affine = acq.grid()
        clean = render_labels_and_tissue(spec, shape, affine)[which]
        images.append(nifti(corrupt(clean, affine, rng, snr=25.0, gain=1000.0), affine))
    out.mkdir(parents=True, exist_ok=True)
    nib.save(images[0], t2p)
    nib.save(images[1], t1p)
    return t2p, t1p


def run_config(backend: str, cascade_mode: bool, t2p: Path, t1p: Path, models: Path, repeats: int) -> dict:
    """One configuration in this process: median stage times over ``repeats`` after a warm-up."""
    import statistics

    import torch

    from imsct import weights
    from imsct.cascade import Cascade
    from imsct.inference import write_outputs
    from imsct.io import load_volume

    t0 = time.perf_counter()
    # "default": what imsct segment and inference.json run here (backend and precision detected);
    # "eager": PyTorch at the default precision; "eager-fp32": the earlier default, float32 on the
    # full 512x256x32 localiser field; "openvino": OpenVINO at the default precision; the exported
    # TorchScript / ONNX graphs run in float32
    opts: dict = {}
    if backend == "eager-fp32":
        kind, opts = "eager", {"precision": "float32", "fit_field": False}
    elif backend in ("default", "eager", "openvino"):
        kind = {"default": "auto"}.get(backend, backend)
    else:
        kind, opts = backend, {"precision": "float32"}
    served = weights.CASCADE_MODELS[False]
    if kind in weights.EXPORT_SUFFIX and not all(weights.exported_path(k, models, kind).exists() for k in served):
        weights.export_models(models, formats=(kind,), keys=served)
    full = Cascade.from_models(models, backend=kind, **opts)
    cascade = full if cascade_mode else Cascade(None, full.segmenter, amp=full.amp, fit_field=full.fit_field, backend=full.backend)
    load_models_s = time.perf_counter() - t0
    seen_windows = [0]  # stage-2 windows the sliding-window inferer really ran (all runs)
    if isinstance(cascade.segmenter, torch.nn.Module) and not isinstance(cascade.segmenter, torch.jit.ScriptModule):
        cascade.segmenter.register_forward_pre_hook(lambda m, inp: seen_windows.__setitem__(0, seen_windows[0] + inp[0].shape[0]))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats + 1):
            tm = {}
            t0 = time.perf_counter()
            t2, t1 = load_volume(t2p, "T2w"), load_volume(t1p, "T1w")
            tm["load"] = time.perf_counter() - t0
            res = cascade(t2, t1)
            tm.update(res.timings)
            t0 = time.perf_counter()
            write_outputs(res.labelmap, t2.affine, "sub-paper_T2w", tmp)
            tm["save"] = time.perf_counter() - t0
            tm["total"] = sum(tm[s] for s in STAGES)
            runs.append(tm)
    steady = {k: statistics.median(r[k] for r in runs[1:]) for k in runs[0]}
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the FLOP count below runs networks
    # arithmetic of the two network stages (eager modules only; exported graphs do the same work)
    flops = {}
    if cascade_mode and seen_windows[0]:
        from imsct.cascade import fitted_field

        t2 = load_volume(t2p, "T2w")
        w = cascade.working(t2)
        field = fitted_field(w.shape, cascade.field_size) if cascade.fit_field else cascade.field_size
        flops["localise"] = conv_flops(weights.build("localiser"), (1, 1, *field))
        n_windows = seen_windows[0] / len(runs)
        flops["segment"] = n_windows * conv_flops(weights.build("tumor"), (1, 2, *cascade.inferer.roi_size))
        flops["windows"] = n_windows
    return {"backend": f"{backend}: {cascade.backend}" + ("" if cascade.fit_field else ", 512x256x32 field"), "cascade": cascade_mode, "threads": torch.get_num_threads(), "load_models_s": load_models_s,
            "cold_total_s": runs[0]["total"], **steady, "flops": flops,
            "peak_rss_gib": peak_rss_gib}


def child(argv) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend")
    ap.add_argument("--whole-field", action="store_true")
    ap.add_argument("--t2")
    ap.add_argument("--t1")
    ap.add_argument("--models")
    ap.add_argument("--repeats", type=int)
    a = ap.parse_args(argv)
    print(json.dumps(run_config(a.backend, not a.whole_field, Path(a.t2), Path(a.t1), Path(a.models), a.repeats)))
    return 0


def in_child(args, backend: str, whole_field: bool, t2p: Path, t1p: Path, models: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--backend", backend, "--t2", str(t2p), "--t1", str(t1p),
           "--models", str(models), "--repeats", str(args.repeats)] + (["--whole-field"] if whole_field else [])
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def server_latencies(t2p: Path, t1p: Path, repeats: int, threads: int = 0) -> dict:
    """/infer/cascade and /activelearning/<strategy> latency on a live MONAI Label server (the
    app's own launcher, as the tests start it) whose datastore holds the paper-sized case."""
    import shutil

    import importlib.util

    # the test suite's launcher of the app (one implementation of "start a server and wait for it"),
    # loaded as the package tests/support without putting tests/ on sys.path
    folder = ROOT / "tests" / "support"
    spec = importlib.util.spec_from_file_location("support", folder / "__init__.py", submodule_search_locations=[str(folder)])
    sys.modules["support"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["support"])
    from support.servers import MonaiLabelServer  # noqa: E402

    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    def median_of(call) -> tuple[float, float]:
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        rest = sorted(times[1:])
        return rest[len(rest) // 2], times[0]

    out: dict = {}
    # the test launcher runs servers on one thread unless OMP_NUM_THREADS says otherwise; a served
    # model gets the same threads as the pipelines above
    os.environ["OMP_NUM_THREADS"] = str(threads or os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        (studies / "T1w").mkdir(parents=True)
        shutil.copy(t2p, studies / "paper.nii.gz")
        shutil.copy(t1p, studies / "T1w" / "paper.nii.gz")
        with MonaiLabelServer(studies, Path(tmp) / "server", {"retrain_after": 0}) as server:
            client = MONAILabelClient(server.url, tmpdir=tmp)
            out["infer_cascade_s"], out["infer_cascade_cold_s"] = median_of(lambda: client.infer("cascade", "paper", {"save_label": False}))
            for strategy in client.info().get("strategies", {}):
                try:
                    warm, cold = median_of(lambda: client.next_sample(strategy, {}))
                except MONAILabelClientException as exc:
                    print(f"/activelearning/{strategy} failed: {exc}\n{server.log_tail(3000)}", file=sys.stderr)
                    continue
                out[f"next_sample_{strategy}_ms"], out[f"next_sample_{strategy}_cold_ms"] = 1000 * warm, 1000 * cold
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per process (default: torch's choice)")
    ap.add_argument("--work", default="work/benchmark")
    ap.add_argument("--backends", default="default,eager-fp32,eager,openvino,torchscript,onnx")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--only-server", action="store_true", help="only the MONAI Label latencies")
    args = ap.parse_args(argv)

    work = Path(args.work)
    t2p, t1p = make_case(work / "case")
    models = work / "models"  # exported files go here, never into bundle/models
    models.mkdir(parents=True, exist_ok=True)
    from imsct import weights

    for key in weights.CASCADE_MODELS[False]:
        weights.path(key, models).write_bytes(weights.path(key).read_bytes())
    import nibabel as nib

    print(f"case: T2w {nib.load(t2p).shape} {tuple(round(float(v), 2) for v in nib.load(t2p).header.get_zooms())} mm, "
          f"T1w {nib.load(t1p).shape}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    if args.only_server:
        for k, v in server_latencies(t2p, t1p, args.repeats, args.threads).items():
            print(f"{k}: {v:.3f}")
        return 0
    rows = []
    for backend in args.backends.split(","):
        rows.append(in_child(args, backend, False, t2p, t1p, models))
    rows.append(in_child(args, args.backends.split(",")[0], True, t2p, t1p, models))
    head = "| pipeline | backend | " + " | ".join(STAGES) + " | total s | cold s | peak RSS GiB |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(f"| {'whole field' if not r['cascade'] else 'cascade'} | {r['backend']} | "
              + " | ".join(f"{r[s]:.2f}" for s in STAGES) + f" | {r['total']:.2f} | {r['cold_total_s']:.2f} | {r['peak_rss_gib']:.2f} |")
    cascades = [r for r in rows if r["cascade"]]
    best = min(cascades, key=lambda r: r["total"])
    default = cascades[0]
    whole = rows[-1]
    speedup = whole["total"] / default["total"]
    fp32 = next((r for r in cascades if r["backend"].startswith("eager-fp32")), None)
    eager = next((r for r in cascades if r["backend"].startswith("eager:")), None)
    print(f"ratios in this run: default ({default['backend']}) vs whole field: {speedup:.2f}x"
          + (f"; vs the float32 full-field path (eager-fp32): {fp32['total'] / default['total']:.2f}x" if fp32 else "")
          + (f"; vs eager PyTorch at the same precision: {eager['total'] / default['total']:.2f}x" if eager else "")
          + f"; fastest: {best['backend']} {best['total']:.2f} s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    peak = machine_conv_gflops()
    print(f"machine float32 3D convolution (32->32 ch, 3x3x3, 64x64x32): {peak:.1f} GFLOP/s on {torch.get_num_threads()} thread(s)")
    for r in cascades:
        f = r.get("flops") or {}
        if f:
            parts = [f"{stage} {f[stage] / 1e9:.0f} GFLOP in {r[stage]:.2f} s = {f[stage] / 1e9 / r[stage]:.1f} GFLOP/s "
                     f"({100 * f[stage] / 1e9 / r[stage] / peak:.0f} % of the float32 conv rate)" for stage in ("localise", "segment")]
            print(f"  {r['backend']}: " + "; ".join(parts) + f"; {f['windows']:.0f} stage-2 windows")
    next_ms = float("nan")
    if not args.skip_server:
        lat = server_latencies(t2p, t1p, args.repeats, args.threads)
        for k, v in lat.items():
            print(f"{k}: {v:.3f}")
        ms = [v for k, v in lat.items() if k.startswith("next_sample_") and not k.endswith("cold_ms")]
        next_ms = max(ms) if ms else float("nan")
    print(f"end_to_end_s={default['total']:.2f} cascade_speedup={speedup:.2f} "
          f"peak_rss_gib={default['peak_rss_gib']:.2f} next_sample_ms={next_ms:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
