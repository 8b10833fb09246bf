"""How long the MONAI Label app keeps other requests waiting while inferences run.

    python scripts/benchmark_app_latency.py [--cases 2] [--inferences 4] [--idle-requests 20] [--demo-max-voxels N] [--json out.json]

Starts the app (``apps/imsct_label/serve.py --demo-cases N``: demo phantoms, the test suite's
launcher, torch on one thread) on a fresh temporary folder, then

1. idle: ``GET /info/`` ``--idle-requests`` times in a row;
2. busy: ``--inferences`` cascade inferences sent at once (``save_label`` false), and meanwhile
   ``GET /info/``, ``GET /datastore/`` and ``POST /activelearning/uncertainty`` in a loop until the
   last inference answers.

Prints the median and maximum latency of each request kind, idle and busy, the busy / idle
ratio of ``/info``'s median, and the inferences' own times. MONAI Label 0.8.5 alone served one
request at a time: ``/info`` then waited for every inference queued before it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _support():
    """tests/support as the package ``support`` (the suite's server launcher), without putting tests/ on sys.path."""
    folder = ROOT / "tests" / "support"
    spec = importlib.util.spec_from_file_location("support", folder / "__init__.py", submodule_search_locations=[str(folder)])
    sys.modules["support"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["support"])
    from support.servers import MonaiLabelServer

    return MonaiLabelServer


def _figures(times: list[float]) -> dict:
    return {"n": len(times), "median_s": round(statistics.median(times), 4), "max_s": round(max(times), 4)} if times else {"n": 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=2, help="demo phantom cases in the datastore")
    ap.add_argument("--demo-max-voxels", type=int, default=0, help="cap of a demo case's T2w matrix (serve.py's; default its own)")
    ap.add_argument("--inferences", type=int, default=4, help="cascade inferences sent at once")
    ap.add_argument("--idle-requests", type=int, default=20)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    import requests

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    MonaiLabelServer = _support()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        studies.mkdir()
        t0 = time.perf_counter()
        with MonaiLabelServer(studies, Path(tmp) / "server", {"retrain_after": 0, "mc_samples": 2},
                              args=["--demo-cases", str(args.cases)]
                              + (["--demo-max-voxels", str(args.demo_max_voxels)] if args.demo_max_voxels else [])) as server:
            url = server.url
            out["server_start_s"] = round(time.perf_counter() - t0, 1)
            ids = sorted(requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"])

            def timed(method, path, **kw) -> float:
                t = time.perf_counter()
                r = requests.request(method, f"{url}{path}", timeout=3600, **kw)
                r.raise_for_status()
                return time.perf_counter() - t

            idle = [timed("GET", "/info/") for _ in range(args.idle_requests)]
            out["idle"] = {"/info": _figures(idle)}

            busy: dict[str, list[float]] = {"/info": [], "/datastore": [], "/activelearning/uncertainty": []}
            done = threading.Event()

            def meanwhile():
                while not done.is_set():
                    busy["/info"].append(timed("GET", "/info/"))
                    busy["/datastore"].append(timed("GET", "/datastore/"))
                    busy["/activelearning/uncertainty"].append(timed("POST", "/activelearning/uncertainty", json={}))
                    time.sleep(0.2)

            def infer(k):
                return timed("POST", "/infer/cascade", params={"image": ids[k % len(ids)], "output": "json"},
                             data={"params": json.dumps({"save_label": False})})

            barrier_start = time.perf_counter()
            with ThreadPoolExecutor(args.inferences + 1) as pool:
                futures = [pool.submit(infer, k) for k in range(args.inferences)]
                time.sleep(0.5)  # the inferences are in flight
                watcher = pool.submit(meanwhile)
                infer_s = [f.result() for f in futures]
                done.set()
                watcher.result()
            out["inferences"] = {"n": args.inferences, "each_s": [round(t, 2) for t in infer_s],
                                 "all_s": round(time.perf_counter() - barrier_start, 2)}
            out["busy"] = {k: _figures(v) for k, v in busy.items()}
            if idle and busy["/info"]:
                out["info_median_ratio_busy_to_idle"] = round(statistics.median(busy["/info"]) / statistics.median(idle), 2)
            out["cases"] = ids
    print(f"{args.inferences} cascade inferences at once on {len(out['cases'])} demo phantom case(s): "
          f"{out['inferences']['all_s']} s in all (each {out['inferences']['each_s']} s)")
    print(f"/info idle: median {out['idle']['/info']['median_s'] * 1000:.0f} ms, max {out['idle']['/info']['max_s'] * 1000:.0f} ms "
          f"({out['idle']['/info']['n']} requests)")
    for name, f in out["busy"].items():
        if f["n"]:
            print(f"{name} during the inferences: median {f['median_s'] * 1000:.0f} ms, max {f['max_s'] * 1000:.0f} ms ({f['n']} requests)")
    if "info_median_ratio_busy_to_idle" in out:
        print(f"/info median busy / idle: {out['info_median_ratio_busy_to_idle']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
