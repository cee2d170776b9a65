"""unireg's registration methods against ANTsPy on the same pairs, in one run: accuracy, time,
peak memory and their ratios.

Every method runs in its own process (so one method's memory cannot hide another's) over the
same pairs; times are per registration (median over the pairs, the first pair included), peak
memory is the largest growth of the process's peak resident set during one registration
(:class:`unireg.profiling.Measure`). Ratios compare each unireg method with the peer named
after it (``--compare unireg:syn=ants:SyN``): below 1 means unireg is faster / smaller.

    python bench/registration_benchmark.py                      # IXI test pairs at 2 mm
    python bench/registration_benchmark.py --t1t2               # + IXI002 T2 onto T1 (MI)
    python bench/registration_benchmark.py --methods unireg:affine ants:Affine \\
        --compare unireg:affine=ants:Affine --threads 2

Needs ../shared/data (or $UNIREG_SHARED_DATA) and antspyx for the ANTs peers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UNIREG_SHARED_DATA", REPO.parent / "shared" / "data"))


def ixi_pairs(split: str = "test", limit: int | None = None) -> list[dict]:
    from unireg.evaluation import pairs_from_manifest

    return [
        {"fixed": str(p.fixed), "moving": str(p.moving), "fixed_labels": str(p.fixed_labels),
         "moving_labels": str(p.moving_labels), "name": f"{p.moving_id}->{p.fixed_id}"}
        for p in pairs_from_manifest(DATA / "manifest.csv", "ixi", split)[:limit]
    ]  # fmt: skip


def t1t2_pair() -> dict:
    base = DATA / "ixi002-t1t2"
    return {
        "fixed": str(base / "hd_bet_IXI002-Guys-0828-T1.nii.gz"),
        "moving": str(base / "hd_bet_IXI002-Guys-0828-T2.nii.gz"),
        "fixed_labels": str(base / "hd_bet_mask_IXI002-Guys-0828-T1.nii.gz"),
        "moving_labels": str(base / "hd_bet_mask_IXI002-Guys-0828-T2.nii.gz"),
        "name": "IXI002 T2->T1 (brain masks)",
    }


def run_method(spec: str, pairs: list[dict], threads: int) -> list[dict]:
    """Run one method over the pairs in this process; one dict of metrics per pair."""
    import torch

    from unireg.evaluation import make_method
    from unireg.io import load_image, load_labels
    from unireg.metrics import consistency_error, registration_metrics

    torch.set_num_threads(threads)
    method = make_method(spec)
    out, transforms = [], {}
    for p in pairs:
        fixed, moving = load_image(p["fixed"]), load_image(p["moving"])
        fl, ml = load_labels(p["fixed_labels"]), load_labels(p["moving_labels"])
        result = method.register(fixed, moving, seed=0)
        m = registration_metrics(result, fixed_labels=fl, moving_labels=ml)
        transforms[(p["fixed"], p["moving"])] = (result.transform, fixed.geometry)
        out.append({
            "pair": p["name"], "dice": m["dice_mean"], "hd95": m.get("hd95_mean"),
            "folding": m["folding_percent"], "jacobian_std": m["jacobian_std"],
            "inverse_consistency_mm": m.get("inverse_consistency_mean_mm"),
            "time": result.elapsed, "memory_mb": (result.peak_memory or 0) / 2**20,
            "stage_seconds": getattr(result.extras, "stage_seconds", None),
        })  # fmt: skip
    # cycle consistency: T_ab then T_ba (the pair run the other way), on a's grid, when both ran
    for p, row in zip(pairs, out, strict=True):
        reverse = transforms.get((p["moving"], p["fixed"]))
        if reverse is not None:
            forward, geom = transforms[(p["fixed"], p["moving"])]
            row["cycle_consistency_mm"] = consistency_error([forward, reverse[0]], geom)["mean_mm"]
    return out


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+",
                    default=["unireg:affine", "ants:Affine", "unireg:syn", "ants:SyN"])  # fmt: skip
    ap.add_argument("--compare", nargs="*",
                    default=["unireg:affine=ants:Affine", "unireg:syn=ants:SyN"])  # fmt: skip
    ap.add_argument("--t1t2", action="store_true", help="also IXI002 T2 onto T1 with MI")
    ap.add_argument("--split", default="test", help="IXI split (train pairs check tuning)")
    ap.add_argument("--max-pairs", type=int, default=None, help="only the first N IXI pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "PAIRS_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec, pairs_json = args.worker
        print(json.dumps(run_method(spec, json.loads(pairs_json), args.threads)))
        return
    if not (DATA / "manifest.csv").exists():
        sys.exit(f"shared data not found at {DATA} (set UNIREG_SHARED_DATA)")
    pairs = ixi_pairs(args.split, args.max_pairs)
    suites = {f"IXI {args.split} pairs, T1 with skull, 2 mm": (pairs, args.methods)}
    if args.t1t2:
        mm = [m + (":multimodal=true" if m.startswith("unireg:") else "") for m in args.methods]
        suites["IXI002 T2 onto T1 (separate oblique grids), MI"] = ([t1t2_pair()], mm)
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(args.threads),
           "OMP_NUM_THREADS": str(args.threads)}  # fmt: skip
    report = {}
    for title, (pairs, methods) in suites.items():
        results = {}
        for spec in methods:
            proc = subprocess.run(
                [sys.executable, __file__, "--threads", str(args.threads), "--worker", spec,
                 json.dumps(pairs)],
                capture_output=True, text=True, env=env, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                print(f"{spec}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[spec] = json.loads(proc.stdout.strip().splitlines()[-1])
        report[title] = results
        print(f"\n## {title} ({len(pairs)} pair(s), {args.threads} threads)\n")
        print("| method | Dice | HD95 (mm) | folding % | Jacobian std | inverse consistency (mm) "
              "| cycle consistency (mm) | time (s, median) | peak memory (MiB) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        summary = {}

        def fmt(v: float | None, digits: int) -> str:
            return "-" if v is None else f"{v:.{digits}f}"

        for spec, rows in results.items():
            s = {
                "dice": statistics.mean(r["dice"] for r in rows),
                "hd95": statistics.mean(r["hd95"] for r in rows),
                "folding": max(r["folding"] for r in rows),
                "jacobian_std": _mean(rows, "jacobian_std"),
                "ic": _mean(rows, "inverse_consistency_mm"),
                "cycle": _mean(rows, "cycle_consistency_mm"),
                "time": statistics.median(r["time"] for r in rows),
                "memory": max(r["memory_mb"] for r in rows),
            }
            summary[spec] = s
            print(f"| {spec} | {s['dice']:.4f} | {s['hd95']:.2f} | {s['folding']:.4f} | "
                  f"{fmt(s['jacobian_std'], 3)} | {fmt(s['ic'], 4)} | {fmt(s['cycle'], 3)} | "
                  f"{s['time']:.2f} | {s['memory']:.0f} |")  # fmt: skip
            stages = [r["stage_seconds"] for r in rows if r.get("stage_seconds")]
            if stages:
                parts = ", ".join(f"{k} {statistics.median(x[k] for x in stages):.2f} s"
                                  for k in stages[0])  # fmt: skip
                print(f"|  ({spec} stages, median: {parts}) | | | | | | | | |")
        for pair in args.compare:
            ours, peer = pair.rsplit("=", 1)  # specs may hold "=" (options), peers do not
            ours = (
                ours if ours in summary else next((k for k in summary if k.startswith(ours)), None)
            )
            if ours is None or peer not in summary:
                continue
            a, b = summary[ours], summary[peer]
            print(f"\n{ours} vs {peer}: Dice {a['dice'] - b['dice']:+.4f}, time "
                  f"{a['time'] / b['time']:.2f}x ({b['time'] / a['time']:.1f}x faster), "
                  f"peak memory {a['memory'] / max(b['memory'], 1e-9):.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
