"""The optimization score of Wallace et al. (2025) and the Pareto fronts of a run's variants, as plain data.

    opt = P_c^1.5 * (alpha * T_c + beta * E_c)

P_c, T_c, E_c: the variant's perplexity, time per generated token and energy per generated token, each as a
ratio to the baseline's; lower is better. alpha and beta weigh time against energy (default 0.5 / 0.5).

Pareto fronts put quality (perplexity, lower is better) against size (bytes, lower), speed (decode tok/s,
higher) and energy (J/token, lower): a variant is on a front when no other variant is at least as good on
both axes and better on one.
"""
from __future__ import annotations

AXES = {  # front name -> (metric, higher is better)
    "size": ("size_bytes", False),
    "speed": ("decode_tps", True),
    "energy": ("energy_j_per_token", False),
}


def opt_score(p_c: float, t_c: float, e_c: float, alpha: float = 0.5, beta: float = 0.5) -> float:
    return p_c ** 1.5 * (alpha * t_c + beta * e_c)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (cost_a, cost_b) no other point dominates (both costs: lower is better)."""
    front = []
    for name, (a, b) in points.items():
        dominated = any(a2 <= a and b2 <= b and (a2 < a or b2 < b)
                        for other, (a2, b2) in points.items() if other != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n])


def score_variants(variants: list[dict], alpha: float = 0.5, beta: float = 0.5,
                   baseline: str = "baseline") -> dict:
    """Score rows (P_c, T_c, E_c, opt) against ``baseline`` and the Pareto fronts, for the CLI and the GUI."""
    by_name = {v["name"]: v.get("metrics", {}) for v in variants}
    base = by_name.get(baseline, {})
    need = ("perplexity", "decode_tps", "energy_j_per_token")
    rows = []
    for v in variants:
        m = by_name[v["name"]]
        row = {"name": v["name"], "format": v.get("format"), "p_c": None, "t_c": None, "e_c": None, "opt_score": None}
        if all(m.get(k) for k in need) and all(base.get(k) for k in need):
            row["p_c"] = m["perplexity"] / base["perplexity"]
            row["t_c"] = base["decode_tps"] / m["decode_tps"]          # time per token, as a ratio
            row["e_c"] = m["energy_j_per_token"] / base["energy_j_per_token"]
            row["opt_score"] = opt_score(row["p_c"], row["t_c"], row["e_c"], alpha, beta)
        rows.append(row)
    fronts = {}
    for front, (key, higher) in AXES.items():
        pts = {n: ((-m[key] if higher else m[key]), m["perplexity"]) for n, m in by_name.items()
               if m.get(key) is not None and m.get("perplexity") is not None}
        fronts[front] = {"metric": key, "quality": "perplexity", "higher_is_better": higher,
                         "members": pareto_front(pts),
                         "points": [{"name": n, key: by_name[n][key], "perplexity": by_name[n]["perplexity"]}
                                    for n in pts]}
    return {"alpha": alpha, "beta": beta, "baseline": baseline, "rows": rows, "pareto": fronts,
            "formula": "opt = P_c^1.5 * (alpha*T_c + beta*E_c), ratios to the baseline, lower is better"}


def verdicts(variants: list[dict], budget, alpha: float, beta: float, projected_of) -> tuple[dict[str, dict], dict]:
    """Per variant: whether it fits the budget (the reasons when not: "not benchmarked" without figures), its
    optimization-score row and the Pareto fronts it is on; and the scores. ``projected_of(variant)`` gives its
    figures projected on the budget's device, or None. The benchmark step and ``edgetailor report`` both judge
    with it."""
    scores = score_variants(variants, alpha, beta)
    rows = {r["name"]: r for r in scores["rows"]}
    out = {}
    for v in variants:
        m = v.get("metrics", {})
        projected = projected_of(v)
        reasons = (budget.check(m, projected, reference=v["name"] == "baseline")
                   if ("peak_rss_bytes" in m or projected) else ["not benchmarked"])
        out[v["name"]] = {"fits": not reasons, "fit_reasons": reasons, "projected": projected, "score": rows[v["name"]],
                          "pareto": [f for f, d in scores["pareto"].items() if v["name"] in d["members"]]}
    return out, scores
