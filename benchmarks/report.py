"""Render latest.json into latest.md and latency_size.png, and write all three."""

from __future__ import annotations

import json
from pathlib import Path

from .compare import images_per_s, p50


def fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if digits is not None:
        return f"{value:.{digits}f}"
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{fmt(value)}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


# Under this many runs a p99 is an interpolation of the slowest one or two: the report names
# the slowest run instead (`make bench QUICK=1` times 30).
P99_RUNS = 100


def _tail_name(runs: int) -> str:
    return "p99" if runs >= P99_RUNS else "max"


def _lat(entry: dict, key: str) -> str:
    stats = entry.get("latency", {}).get(key, {})
    if "p50_ms" not in stats:
        return "-"
    few = _tail_name(stats.get("runs", 0)) == "max"  # results from before max_ms: "-"
    tail = stats.get("max_ms") if few else stats["p99_ms"]
    return f"{fmt(stats['p50_ms'])} / {fmt(stats['p95_ms'])} / {fmt(tail)}"


def _keras_rows(keras: dict) -> list[tuple[str, dict]]:
    if "error" in keras:
        return []
    return [("Keras `model(x)`", keras["call"]), ("Keras `model.predict(x)`", keras["predict"])]


def _artifact_tables(results: dict) -> list[str]:
    keras, cores = results["keras"], results["machine"]["cores_available"]
    lines = ["## Artifacts", "",
             f"Ratios are against the Keras model (`{results['keras_model'].get('path')}`): "
             "`x faster` = Keras `model(x)` p50 / artifact p50; size and memory ratios are "
             "artifact / Keras.", "", "### Size, load time, memory", ""]
    rows = []
    for name, e in results["artifacts"].items():
        vs = e.get("vs_keras", {})
        rows.append([name, e["precision"], e["status"], fmt(e["size_bytes"] / 1024),
                     _x(vs.get("size_ratio_x")), fmt(e.get("load_ms")),
                     fmt(e.get("memory", {}).get("peak_rss_mb")), _x(vs.get("rss_ratio_x"))])
    if "error" not in keras:
        rows.append(["Keras .keras", "fp32", "baseline", fmt(keras["size_bytes"] / 1024), "1x",
                     fmt(keras.get("load_ms")), fmt(keras.get("memory", {}).get("peak_rss_mb")),
                     "1x"])
    lines += _table(["Artifact", "Precision", "Parity", "Size (KiB)", "vs Keras", "Load (ms)",
                     "Peak RSS (MiB)", "vs Keras"], rows)
    lines += ["Load: `Classifier.from_bundle` (manifest, sha256, engine set-up) in a warm process; "
              "Keras: `load_model` after TensorFlow is imported "
              f"(import itself: {fmt(keras.get('import_s'))} s). Peak RSS: a fresh process that loads "
              "the artifact and classifies `scan.png` (Keras: Pillow + `predict`).", "",
              *_limit_lines(results.get("memory_limits", {})),
              f"### Batch-1 latency, ms (p50 / p95 / {_tail_name(results['plan']['runs'])} over "
              f"{results['plan']['runs']} runs)", ""]
    rows = []
    for name, e in results["artifacts"].items():
        vs = e.get("vs_keras", {})
        rows.append([name, _lat(e, "1_thread"), _x(vs.get("speedup_1_thread_x")),
                     _lat(e, "all_cores"), _x(vs.get("speedup_all_cores_x"))])
    rows += [[label, _lat(e, "1_thread"), "", _lat(e, "all_cores"), ""] for label, e in _keras_rows(keras)]
    lines += _table(["Artifact", "1 thread", "x faster", f"{cores} threads", "x faster"], rows)
    if keras.get("one_thread_from"):
        lines += [f"Keras at 1 thread: measured in {keras['one_thread_from']}.", ""]
    lines += [f"### Throughput, images/s at {cores} threads", ""]
    rows = []
    for name, e in results["artifacts"].items():
        vs = e.get("vs_keras", {})
        rows.append([name, fmt(images_per_s(e, 16)), _x(vs.get("throughput_b16_x")),
                     fmt(images_per_s(e, 32)), _x(vs.get("throughput_b32_x"))])
    rows += [[label, fmt(images_per_s(e, 16)), "", fmt(images_per_s(e, 32)), ""]
             for label, e in _keras_rows(keras)]
    return lines + _table(["Artifact", "batch 16", "vs Keras", "batch 32", "vs Keras"], rows)


def _limit_lines(limits: dict) -> list[str]:
    """Peak RSS classifying the largest accepted input of each kind, against the bound."""
    if "inputs" not in limits:
        return [f"Peak RSS at the input limits not measured: {limits.get('error')}", ""]
    lines = [f"### Peak RSS at the input limits ({limits['artifact']}; bound "
             f"{limits['bound_mb']} MiB; at most {limits['max_pixels']:,} pixels and "
             f"{limits['max_file_bytes'] / 2**20:.0f} MiB a file)", ""]
    rows = [[kind, e["input"], fmt(e["peak_rss_mb"]), fmt(e["wall_s"])]
            for kind, e in limits["inputs"].items()]
    return lines + _table(["Kind", "Input (a fresh process classifies it)", "Peak RSS (MiB)",
                           "Wall (s)"], rows)


def _per_image_table(per_image: dict, described: dict) -> list[str]:
    if "error" in per_image:
        return [f"Not measured: {per_image['error']}", ""]
    rows = []
    for name, e in per_image.items():
        info = described.get(name, {})
        naive = e.get("naive", {})
        size = f"{info.get('width')}x{info.get('height')}" if info.get("width") else "-"
        if "error" in e:
            rows.append([name, size, fmt(info.get("bytes", 0) / 1024), "error", "", "", "", "", "",
                         ""])
            continue
        estimate = e.get("estimate_ms")  # absent from results made before it was timed
        rows.append([name, size, fmt(info.get("bytes", 0) / 1024),
                     "-" if estimate is None else fmt(estimate), fmt(e["decode_ms"]),
                     fmt(e["preprocess_ms"]), fmt(e["inference_ms"]), fmt(e["total_ms"]),
                     fmt(naive.get("total_ms")), _x(e.get("speedup_x"))])
    table = _table(["Input", "Pixels", "File (KiB)", "Header estimate", "Decode", "Preprocess",
                    "Inference", "Total (ms)", "Pillow + Keras predict (ms)", "Speed-up"], rows)
    return [*table, "Header estimate: the memory-bound read `serve` and a `ct-edge classify` of "
            "several files make before decoding, timed from the file (not in Total, which is "
            "`Classifier.predict`).", ""]


def _cold_lines(cold: dict, profile: dict) -> list[str]:
    lines = []
    if "median_s" in cold:
        lines += [f"Cold start, `{cold['command']}`: median **{fmt(cold['median_s'])} s** over "
                  f"{cold['runs']} runs (min {fmt(cold['min_s'])}, max {fmt(cold['max_s'])}; first "
                  f"output after {fmt(cold['median_to_first_output_s'])} s); peak RSS "
                  f"{fmt(cold['peak_rss_mb'])} MiB.", ""]
    else:
        lines += [f"Cold start not measured: {cold.get('error')}", ""]
    if profile.get("stages"):
        rows = [["python start (`python -c pass`)", fmt(profile["python_start_ms"]),
                 fmt(profile["python_start_rss_mb"])]]
        rows += [[name, fmt(v["ms"]), fmt(v["rss_mb"])] for name, v in profile["stages"].items()]
        lines += [f"Where a cold classification goes (fresh process, {profile.get('artifact')}; "
                  f"total {fmt(profile.get('total_s'))} s):", ""]
        lines += _table(["Stage", "ms", "RSS after (MiB)"], rows)
    return lines


def markdown(results: dict) -> str:
    m, e2e, pi = results["machine"], results["end_to_end"], results["pi_profile"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    lines = [
        "# ct-edge benchmarks", "",
        f"{results['created']} · {results['mode']} mode · bundle `{results['bundle']['path']}` "
        f"(default artifact {results['bundle']['default']}) · {fmt(results.get('wall_s'))} s", "",
        f"Machine: {m['cpu_model']}, {m['cores_available']} of {m['cores']} cores, "
        f"{m['memory_total_mb']} MiB, {m['os']} {m['machine']}, Python {m['python']}; {packages}. "
        f"Load average at start {m['load_average_start']}, at end {m.get('load_average_end')}: "
        "absolute times move with the machine and its load; the ratios travel better.", "",
        "## Goals", ""]
    lines += _table(["Goal", "Target", "Measured", "Status", "What bounds it"],
                    [[g["goal"], f"{fmt(g['target'])} {g['unit']}", g["measured_text"],
                      f"**{g['status']}**", g["detail"]] for g in results["goals"]])
    lines += _artifact_tables(results)
    lines += [f"## End to end (`{e2e['artifact']}`, {e2e['threads']} threads)", ""]
    lines += _cold_lines(e2e.get("cold_start", {}), e2e.get("cold_start_profile", {}))
    lines += ["Per image, ms (median of "
              f"{results['plan']['repeats']}): ct-edge's decode / preprocess / inference "
              "(`Prediction.timings_ms`) against the path a user would write: Pillow full decode + "
              "resize + Keras `model.predict` (pydicom for DICOM).", ""]
    lines += _per_image_table(e2e.get("per_image", {}), results["inputs"]["per_image"])
    folder = results["folder"]
    lines += [f"## Folder throughput (`ct-edge classify --json`, {folder['images']} JPEGs of 512 px)", ""]
    rows = []
    for key, label in (("all_cores", f"all {folder['cores']} cores"),
                       ("one_core", "one core, `--threads 1`")):
        run = folder.get(key, {})
        rows.append([label, fmt(run.get("wall_s")), fmt(run.get("images_per_s")),
                     str(run.get("answers", "-")), run.get("error", "")[:120]])
    lines += _table(["Run", "Wall (s, incl. start-up)", "Images/s", "Answers", "Error"], rows)
    lines += [f"All cores run at {_x(folder.get('speedup_x'))} the one-core rate.", ""]
    lines += ["## Pi-class profile (a proxy, NOT a Raspberry Pi)", "", f"> {pi['note']}", "",
              f"Pinned to core {pi['cpus']}, 1 thread. Batch-1 latency, ms (p50 / p95 / "
              f"{_tail_name(results['plan']['runs'])}):", ""]
    rows = [[name, _lat(e, "1_thread"), _x(e.get("vs_keras", {}).get("speedup_1_thread_x")),
             fmt(images_per_s(e, 16)), fmt(images_per_s(e, 32))]
            for name, e in pi["artifacts"].items()]
    rows += [[label, _lat(e, "1_thread"), "", "", ""] for label, e in _keras_rows(pi["keras"])]
    lines += _table(["Artifact", "1 thread, 1 core", "x faster than Keras", "img/s b16",
                     "img/s b32"], rows)
    lines += _cold_lines(pi["end_to_end"].get("cold_start", {}),
                         pi["end_to_end"].get("cold_start_profile", {}))
    lines += ["Per image on one core, 1 thread, ms:", ""]
    lines += _per_image_table(pi["end_to_end"].get("per_image", {}), results["inputs"]["per_image"])
    if results.get("errors"):
        lines += ["## Steps that failed", ""]
        lines += [f"- {e['step']}: {e['error']}" for e in results["errors"]] + [""]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    """Two panels: batch-1 p50 latency (1 thread and all cores) and file size per artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [(name, e) for name, e in results["artifacts"].items() if "latency" in e]
    keras = results["keras"]
    rows = [*entries, *_keras_rows(keras)]
    labels = [name.replace("`", "") for name, _ in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 2),
                                      gridspec_kw={"width_ratios": [3, 2]})
    y = range(len(rows))
    cores = results["machine"]["cores_available"]
    for offset, key, label in ((-0.2, "1_thread", "1 thread"),
                               (0.2, "all_cores", f"{cores} threads")):
        values = [p50(e, key) or 0.0 for _, e in rows]
        left.barh([i + offset for i in y], values, height=0.4, label=label)
    left.set_xscale("log")
    left.set_xlabel("batch-1 latency p50, ms (log scale; shorter is faster)")
    left.legend()
    sizes = [e["size_bytes"] / 1024 for _, e in entries]
    size_labels = [name for name, _ in entries]
    if "error" not in keras:
        sizes.append(keras["size_bytes"] / 1024)
        size_labels.append("Keras .keras")
    right.barh(range(len(sizes)), sizes, color="tab:gray")
    right.set_yticks(range(len(sizes)), size_labels)
    right.set_xlabel("file size (KiB)")
    for i, size in enumerate(sizes):
        right.annotate(fmt(size), (size, i), xytext=(3, 0), textcoords="offset points",
                       va="center", fontsize=8)
    left.set_yticks(list(y), labels)
    for axis in (left, right):
        axis.invert_yaxis()
    fig.suptitle(f"ct-edge artifacts on {results['machine']['cpu_model']} ({results['mode']} run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "latest.json", out / "latest.md"]
    try:
        chart(results, out / "latency_size.png")
        paths.append(out / "latency_size.png")
    except Exception as exc:  # the figures are in the JSON and the tables; the chart is extra
        results["errors"].append({"step": "chart", "error": f"{type(exc).__name__}: {exc}"})
    paths[0].write_text(json.dumps(results, indent=2) + "\n")
    paths[1].write_text(markdown(results))
    return paths
