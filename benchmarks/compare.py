"""Shape worker results into the sections of latest.json, with ratios against the Keras baseline."""

from __future__ import annotations

from pathlib import Path

UNITS = {
    "*_ms": "milliseconds", "*_s": "seconds", "*_bytes": "bytes", "*_mb": "MiB (2^20 bytes)",
    "images_per_s": "images per second", "*_x": "ratio, no unit (speedup_x > 1: faster than the "
    "reference; size_ratio_x / rss_ratio_x < 1: smaller)", "width, height": "pixels",
    "runs, repeats, batch, batches, threads, images, answers, cores": "count",
}

def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def describe_image(path: Path) -> dict:
    """File size and pixel size of an input, without decoding its pixels."""
    info: dict = {"file": str(path), "bytes": path.stat().st_size, "width": None, "height": None}
    try:
        if path.suffix.lower() in (".dcm", ".dicom"):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            info.update(width=int(ds.Columns), height=int(ds.Rows), kind="DICOM")
        else:
            from PIL import Image

            with Image.open(path) as image:
                info.update(width=image.width, height=image.height,
                            kind=f"{image.format} {image.mode}")
    except Exception as exc:  # a description is best effort; the benchmark reports the real error
        info["kind"] = f"unreadable ({type(exc).__name__})"
    return info


def latency_entry(result: dict, one: int, many: int | None) -> dict:
    """An artifact's worker result -> {latency: {1_thread, all_cores}, throughput, load_ms}."""
    if "error" in result:
        return {"error": result["error"]}
    by_threads = result["threads"]
    entry: dict = {"load_ms": by_threads[str(one)]["load_ms"],
                   "latency": {"1_thread": by_threads[str(one)]}}
    if many is not None:
        entry["latency"]["all_cores"] = by_threads[str(many)]
    entry["throughput"] = result.get("throughput", [])
    return entry


def keras_entry(full: dict, one: dict, many: int | None) -> dict:
    """Keras worker results (all cores, one thread) -> the same shape as an artifact's entry."""
    if "error" in full:
        return {"error": full["error"]}
    entry: dict = {key: full.get(key) for key in ("import_s", "load_ms", "size_bytes", "tensorflow",
                                                  "keras")}
    entry["memory"] = full.get("memory", {"error": "not measured in this process"})
    for api in ("call", "predict"):
        single = _stats(one[api]) if api in one else {"error": one.get("error", "not measured")}
        entry[api] = {"latency": {"1_thread": single}, "throughput": full[api].get("throughput", [])}
        if many is not None:
            entry[api]["latency"]["all_cores"] = _stats(full[api])
    return entry


def _stats(measured: dict) -> dict:
    return {key: value for key, value in measured.items() if key != "throughput"}


def per_image_entry(split: dict, keras: dict) -> dict:
    """The runtime's per-image split next to the naive Pillow + Keras path, with the speed-up."""
    if "error" in split:
        return {"error": split["error"]}
    naive_all = keras.get("naive") or {}
    out = {}
    for name, timing in split["inputs"].items():
        naive = naive_all.get(name) or {"error": keras.get("error", "naive path not measured")}
        out[name] = {**timing, "naive": naive,
                     "speedup_x": ratio(naive.get("total_ms"), timing.get("total_ms"))}
    return out


def p50(entry: dict, threads: str) -> float | None:
    return entry.get("latency", {}).get(threads, {}).get("p50_ms")


def images_per_s(entry: dict, batch: int) -> float | None:
    return next((t.get("images_per_s") for t in entry.get("throughput", []) if t["batch"] == batch),
                None)


def _compare(entry: dict, keras: dict, threads: tuple[str, ...]) -> dict:
    call, predict = keras.get("call", {}), keras.get("predict", {})
    out = {"size_ratio_x": ratio(entry.get("size_bytes"), keras.get("size_bytes")),
           "rss_ratio_x": ratio(entry.get("memory", {}).get("peak_rss_mb"),
                                keras.get("memory", {}).get("peak_rss_mb"))}
    for key in threads:
        out[f"speedup_{key}_x"] = ratio(p50(call, key), p50(entry, key))
        out[f"speedup_vs_predict_{key}_x"] = ratio(p50(predict, key), p50(entry, key))
    for batch in (16, 32):
        out[f"throughput_b{batch}_x"] = ratio(images_per_s(entry, batch), images_per_s(call, batch))
    return out


def add_ratios(results: dict) -> None:
    """`vs_keras` on every artifact: size, memory, latency and throughput against the Keras model."""
    for entry in results["artifacts"].values():
        entry["vs_keras"] = _compare(entry, results["keras"], ("1_thread", "all_cores"))
    pi = results["pi_profile"]
    for entry in pi["artifacts"].values():
        entry["vs_keras"] = {k: v for k, v in _compare(entry, pi["keras"], ("1_thread",)).items()
                             if "speedup" in k or "throughput" in k}
