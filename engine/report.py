"""A run's variants against a device budget: measured and projected figures, fit, score, Pareto fronts.

``run_report(manifest, budget, alpha, beta)`` returns plain data (the CLI prints it, the GUI plots it).
On this machine the measured figures decide the fit; on another device the projected ones do (memory as
predicted for its runtime, decode speed and energy from the device's roofline), labelled as such.
"""
from __future__ import annotations

from .devices import HOST_ID, Budget
from .scoring import verdicts


def run_report(manifest: dict, budget: Budget, alpha: float = 0.5, beta: float = 0.5, folder=None) -> dict:
    judged, scores = verdicts(manifest.get("variants", []), budget, alpha, beta,
                              lambda v: _projected(manifest, v, budget, folder))
    rows = []
    for v in manifest.get("variants", []):
        m, j = v.get("metrics", {}), judged[v["name"]]
        rows.append({"name": v["name"], "format": v.get("format"), "size_bytes": m.get("size_bytes"),
                     "perplexity": m.get("perplexity"), "ppl_increase_pct": m.get("ppl_increase_pct"),
                     "kl": m.get("kl"), "peak_rss_bytes": m.get("peak_rss_os_bytes") or m.get("peak_rss_bytes"),
                     "predicted_memory_bytes": m.get("predicted_memory_bytes"), "decode_tps": m.get("decode_tps"),
                     "projected_decode_tps_here": m.get("projected_decode_tps_here"),
                     "energy_j_per_token": m.get("energy_j_per_token"),
                     "energy_provenance": m.get("energy_provenance"), "projected": j["projected"],
                     "fits": j["fits"], "fit_reasons": j["fit_reasons"], "opt_score": j["score"]["opt_score"],
                     "pareto": j["pareto"]})
    return {"run": manifest.get("id"), "budget": budget.to_dict(), "device": budget.device.to_dict(),
            "rows": rows, "scores": scores}


def _projected(manifest: dict, v: dict, budget: Budget, folder) -> dict | None:
    """The variant projected on the budget's device from its file (another device than the run's), or None."""
    from pathlib import Path

    from .errors import EdgeTailorError
    from .projection import project, variant_info

    m = v.get("metrics", {})
    if budget.device.id == HOST_ID or "predicted_memory_bytes" not in m:
        return None
    path = (Path(folder) / v["path"]) if (folder and v.get("path")) else manifest["source"].get("path")
    used = m.get("bench_prompt_tokens", 0) + m.get("bench_gen_tokens", 0)
    try:
        info = variant_info(v["format"], path, manifest.get("options", {}).get("dtype", "float32"), tokens_used=used)
        return project(budget.device, info, _bench_ctx(manifest), used,
                       {"overhead_bytes": m.get("predicted_overhead_bytes")})
    except (EdgeTailorError, OSError, KeyError):
        return None


def _bench_ctx(manifest: dict) -> int:
    for s in manifest.get("recipe", {}).get("steps", []):
        if s.get("step") == "benchmark":
            return int((s.get("params") or {}).get("n_ctx", 512))
    return 512


def format_report(rep: dict) -> str:
    mb = 1e6
    dev = rep["device"]
    here = dev["id"] == HOST_ID
    lines = [f"run {rep['run']}  device {dev['name']} ({dev['id']})  memory limit "
             f"{rep['budget']['max_memory_bytes'] / mb:.0f} MB"
             + (f", min {rep['budget']['min_decode_tps']:g} tok/s" if rep['budget']['min_decode_tps'] else "")
             + (f", max {rep['budget']['max_j_per_token']:g} J/token" if rep['budget']['max_j_per_token'] else "")
             + (f", max +{rep['budget']['max_ppl_increase_pct']:g}% ppl" if rep['budget']['max_ppl_increase_pct']
                is not None else "")
             + (f", max KL {rep['budget']['max_kl']:g}" if rep['budget']['max_kl'] is not None else "")]
    head = ["variant", "size MB", "ppl", "Δppl %", "peak MB", "pred MB", "tok/s", "proj tok/s", "J/token", "energy",
            "opt", "pareto", "fit"]
    table = []
    for r in rep["rows"]:
        p = r["projected"] or {}
        table.append([
            r["name"], _f(r["size_bytes"], lambda v: f"{v / mb:.1f}"), _f(r["perplexity"], lambda v: f"{v:.3f}"),
            _f(r["ppl_increase_pct"], lambda v: f"{v:+.2f}"),
            _f(r["peak_rss_bytes"], lambda v: f"{v / mb:.0f}") if here else "-",
            _f(p.get("memory_bytes", r["predicted_memory_bytes"]), lambda v: f"{v / mb:.0f}"),
            _f(r["decode_tps"], lambda v: f"{v:.1f}") if here else "-",
            _f(p.get("decode_tps", r["projected_decode_tps_here"]), lambda v: f"{v:.1f}"),
            _f(p.get("j_per_token", r["energy_j_per_token"] if here else None), lambda v: f"{v:.4f}"),
            ("measured" if here and "measured" in (r["energy_provenance"] or "")[:9] else
             "estimated" if here and r["energy_provenance"] else "projected" if p else "-"),
            _f(r["opt_score"], lambda v: f"{v:.3f}"), ",".join(r["pareto"]) or "-",
            "fits" if r["fits"] else "NO: " + "; ".join(r["fit_reasons"])])
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths)) for t in table]
    lines.append(f"opt = P_c^1.5 (α T_c + β E_c), α={rep['scores']['alpha']:g} β={rep['scores']['beta']:g}, "
                 "ratios to the baseline (lower is better); pareto: fronts of perplexity against size, speed, energy")
    if not here:
        lines.append("On another device memory is predicted and speed/energy projected (roofline); see the JSON "
                     "output for each method.")
    provs = sorted({r["energy_provenance"] for r in rep["rows"] if r["energy_provenance"]})
    lines += [f"energy: {p}" for p in provs]
    return "\n".join(lines)


def _f(v, fmt) -> str:
    return "-" if v is None else fmt(v)
