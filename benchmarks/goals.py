"""The issue's goals, each with its measured value, met / missed, and what bounds it."""

from __future__ import annotations

from ct_edge.limits import MEMORY_BOUND_MB

from .compare import p50
from .report import fmt

GOAL_INT8_P50_MS = 0.5
GOAL_COLD_START_S = 0.3
GOAL_RSS_MB = 80.0
GOAL_E2E_MS = 10.0
GOAL_SPEEDUP_X = 20.0
GOAL_INPUT = "jpeg-2000"


def _goal(key: str, text: str, target: float, unit: str, measured: float | None, detail: str,
          higher_is_better: bool = False) -> dict:
    if measured is None:
        status = "not measured"
    elif (measured >= target) if higher_is_better else (measured <= target):
        status = "met"
    else:
        status = "missed"
        off = target / measured if higher_is_better else measured / target
        detail = f"missed by {fmt(abs(measured - target))} {unit} ({fmt(off)}x the target); {detail}"
    return {"id": key, "goal": text, "target": target, "unit": unit, "measured": measured,
            "measured_text": "-" if measured is None else f"{fmt(measured)} {unit}",
            "status": status, "detail": detail}


def _slowest_stages(profile: dict, top: int = 3) -> str:
    """The cold-start stages that cost the most time."""
    stages = {name: v["ms"] for name, v in (profile.get("stages") or {}).items()}
    if not stages:
        return "no cold-start profile"
    stages["python start"] = profile.get("python_start_ms") or 0.0
    ranked = sorted(stages.items(), key=lambda kv: -kv[1])[:top]
    return "largest stages: " + ", ".join(f"{name} {fmt(ms)} ms" for name, ms in ranked)


def _largest_growth(profile: dict, top: int = 3) -> str:
    """The cold-start stages that added the most resident memory."""
    stages = profile.get("stages") or {}
    if not stages:
        return "no cold-start profile"
    steps, before = [], profile.get("python_start_rss_mb") or 0.0
    for name, value in stages.items():
        steps.append((name, value["rss_mb"] - before))
        before = value["rss_mb"]
    ranked = sorted(steps, key=lambda kv: -kv[1])[:top]
    return (f"python alone {fmt(profile.get('python_start_rss_mb'))} MiB; largest growth: "
            + ", ".join(f"{name} +{fmt(mb)} MiB" for name, mb in ranked))


def goals(results: dict) -> list[dict]:
    """The issue's goals with the measured value and met / missed / not measured."""
    int8 = next(((name, e) for name, e in results["artifacts"].items()
                 if e["format"] == "tflite" and e["precision"] == "int8"), (None, {}))
    e2e = results["end_to_end"]
    cold, profile = e2e.get("cold_start", {}), e2e.get("cold_start_profile", {})
    split = e2e.get("per_image", {}).get(GOAL_INPUT, {})
    naive = split.get("naive", {})
    if cold.get("peak_rss_mb"):
        rss, rss_source = cold["peak_rss_mb"], "the `ct-edge classify scan.png` process"
    else:
        default = results["bundle"]["default"]
        rss = results["artifacts"].get(default, {}).get("memory", {}).get("peak_rss_mb")
        rss_source = f"a process classifying one image with {default} (CLI not measured)"
    limits = results.get("memory_limits", {})
    pi_int8 = results["pi_profile"]["artifacts"].get(int8[0] or "", {})
    pi_split = results["pi_profile"]["end_to_end"].get("per_image", {}).get(GOAL_INPUT, {})
    return [
        _goal("int8_p50", "Full-int8 TFLite batch-1 inference p50 on one thread", GOAL_INT8_P50_MS,
              "ms", p50(int8[1], "1_thread"),
              f"artifact {int8[0]}; bound by the engine's invoke (warm, input already "
              f"preprocessed); pinned-core proxy p50 {fmt(p50(pi_int8, '1_thread'))} ms"
              if int8[0] else "the bundle has no full-int8 TFLite artifact"),
        _goal("cold_start", "`ct-edge classify scan.png` cold start (process start to answer)",
              GOAL_COLD_START_S, "s", cold.get("median_s"),
              (cold.get("error") or f"median of {cold.get('runs')}") + "; "
              + _slowest_stages(profile)),
        _goal("rss", "Peak RSS of the runtime", GOAL_RSS_MB, "MiB", rss,
              f"{rss_source}; {_largest_growth(profile)}"),
        _goal("rss_limits", "Peak RSS classifying the largest accepted input",
              float(limits.get("bound_mb", MEMORY_BOUND_MB)), "MiB",
              limits.get("worst_peak_rss_mb"),
              f"{limits['worst']}: {limits['inputs'][limits['worst']]['input']}"
              if "worst" in limits else limits.get("error", "not measured")),
        _goal("e2e_2000", "Per image end to end incl. decode of a 2000-px JPEG", GOAL_E2E_MS, "ms",
              split.get("total_ms"),
              f"decode {fmt(split.get('decode_ms'))} + preprocess {fmt(split.get('preprocess_ms'))} "
              f"+ inference {fmt(split.get('inference_ms'))} ms with {e2e.get('artifact')} at "
              f"{e2e.get('threads')} threads; one core: {fmt(pi_split.get('total_ms'))} ms"),
        _goal("speedup_2000", "2000-px JPEG: speed-up over Pillow full decode + Keras predict",
              GOAL_SPEEDUP_X, "x", split.get("speedup_x"),
              f"naive {fmt(naive.get('total_ms'))} ms (decode+resize "
              f"{fmt(naive.get('decode_resize_ms'))}, predict {fmt(naive.get('inference_ms'))}); "
              f"one core: {fmt(pi_split.get('speedup_x'))}x",
              higher_is_better=True),
    ]
