"""results.json -> report.md (a table) and report.png (end-to-end latency and peak memory bars)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLUMNS = [
    ("configuration", None), ("task", "task"), ("e2e s", "e2e_s"), ("speed-up", "speedup_vs_baseline"), ("U-Net step s (p90)", None),
    ("text enc s", "text_encoder_s"), ("VAE dec s", "vae_decode_s"), ("VAE enc s", "vae_encode_s"), ("load s cold/warm", None),
    ("peak RSS MB", "peak_rss_mb"), ("load/denoise/decode MB", None), ("memory ratio", "memory_vs_baseline"), ("engine MB", "engine_mb"),
    ("build s", "build_s"), ("U-Net GFLOP/s", "unet_gflops"), ("of roofline", "roofline_fraction"), ("PSNR vs fp32 dB", "image_psnr_vs_fp32_db"),
    ("PSNR vs default dB", None),
]


def _fmt(value, key: str | None = None) -> str:
    if value is None:
        return "-"
    if key in ("speedup_vs_baseline", "memory_vs_baseline"):
        return f"{value:.2f}x"
    if key == "roofline_fraction":
        return f"{100 * value:.0f}%"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def config_name(backend: str, precision: str, shape: str = "dynamic") -> str:
    return f"{backend} {precision}" + (" static" if shape == "static" else "")


def _label(row: dict) -> str:
    if row["backend"] == "diffusers":
        return f"diffusers (PyTorch eager {row['precision']})"
    if row["backend"] == "openvino-genai":
        return f"OpenVINO GenAI on sdrt's openvino {row['precision']} engines ({row['scheduler']})"
    return "sdrt " + config_name(row["backend"], row["precision"], row.get("shape", "dynamic")) + (f" {row['variant']}" if row.get("variant") else "")


def markdown(results: dict) -> str:
    c, m = results["config"], results["machine"]
    lines = [
        f"# sdrt bench: {c['model']} at {c['width']}x{c['height']}, {c['steps']} steps, {c['scheduler']}, {', '.join(c.get('tasks', ['txt2img']))}",
        "",
        f"{c['date']}; {m['model']}, {m['cores']} cores ({' '.join(m['features'])}), {m['ram_mb']} MB RAM; threads {c['threads'] or 'all'}; "
        f"median of {c['repeat']} after {c['warmup']} warm-up; fp32 GEMM {results['gemm_gflops']:.0f} GFLOP/s; "
        f"U-Net {c['unet_gflop_per_step']:.0f} GFLOP per step (batch 2).",
        "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in results["rows"]:
        cells = []
        for name, key in COLUMNS:
            if name == "configuration":
                cells.append(_label(row))
            elif name.startswith("U-Net step"):
                cells.append(f"{_fmt(row['unet_step_s'])} ({_fmt(row['unet_step_p90_s'])})")
            elif name.startswith("load s"):
                cells.append(f"{_fmt(row.get('load_s'))} / {_fmt(row.get('load_warm_s'))}")
            elif name.startswith("load/"):
                stages = row.get("peak_rss_stage_mb")
                cells.append(" / ".join(_fmt(stages[k]) for k in ("load", "denoise", "decode")) if stages else "-")
            elif name.startswith("PSNR vs default"):
                cells.append("identical" if row.get("image_identical_to_default") else _fmt(row.get("image_psnr_vs_default_db")))
            else:
                cells.append(_fmt(row.get(key), key))
        lines.append("| " + " | ".join(cells) + " |")
    for skip in results.get("skipped", []):
        what = "Not run" if skip.get("task") else "Not built"
        variant = f" {skip['variant']}" if skip.get("variant") else ""
        lines.append(f"\n{what}: {config_name(skip['backend'], skip['precision'], skip.get('shape', 'dynamic'))}{variant}: {skip['reason']}")
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    """Two horizontal bar charts side by side: end-to-end seconds and peak RSS in MB."""
    rows = results["rows"]
    label_w, bar_w, row_h, top = 260, 300, 26, 40
    width, height = label_w + 2 * (bar_w + 90), top + row_h * len(rows) + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for panel, (title, key, color) in enumerate((("end-to-end s", "e2e_s", (52, 101, 164)), ("peak RSS MB", "peak_rss_mb", (204, 102, 0)))):
        x0 = label_w + panel * (bar_w + 90)
        draw.text((x0, 10), title, fill="black")
        top_value = max(r[key] for r in rows) or 1
        for k, row in enumerate(rows):
            y = top + k * row_h
            if panel == 0:
                draw.text((8, y + 6), f"{_label(row)}, {row.get('task', 'txt2img')}", fill="black")
            length = int(bar_w * row[key] / top_value)
            draw.rectangle([x0, y + 4, x0 + length, y + row_h - 4], fill=color)
            draw.text((x0 + length + 6, y + 6), _fmt(row[key]), fill="black")
    image.save(path)


def _variant_points(results: dict) -> list[tuple[str, float, float | None]]:
    """(label, speed-up over the configuration's own row, image PSNR vs that row or None if identical) per variant row."""
    own = {(r["task"], r["backend"], r["precision"], r.get("shape")): r for r in results["rows"] if r.get("variant") == ""}
    points = []
    for row in results["rows"]:
        base = own.get((row["task"], row["backend"], row["precision"], row.get("shape")))
        if row.get("variant") and base:
            points.append((f"{row['backend']} {row['precision']} {row['variant']}, {row['task']}", base["e2e_s"] / row["e2e_s"],
                           None if row.get("image_identical_to_default") else row["image_psnr_vs_default_db"]))
    return points


def curve(results: dict, path: Path) -> None:
    """Speed against quality, one point per variant: speed-up over its configuration's own row (x), image PSNR
    against that row's image (y; identical images on the top line)."""
    points = _variant_points(results)
    width, height, left, bottom, top = 1000, 420, 60, 40, 30
    plot_w, plot_h = 460, height - top - bottom
    x_max = max(2.0, max(x for _, x, _ in points) * 1.1)
    finite = [y for _, _, y in points if y is not None]
    y_min, y_max = min([20.0, *finite]), max([60.0, *finite]) + 10  # the top line holds the identical ones
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    draw.text((left, 8), "speed-up over the same engines without the shortcut (x) vs image PSNR against them (y, dB)", fill="black")
    for tick in np.arange(0.0, x_max + 1e-9, 0.5):
        x = left + plot_w * tick / x_max
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill="black")
        draw.text((x - 8, top + plot_h + 8), f"{tick:g}x", fill="black")
    for tick in range(int(y_min // 10 * 10), int(y_max), 10):
        y = top + plot_h * (1 - (tick - y_min) / (y_max - y_min))
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((left - 30, y - 6), str(tick), fill="black")
    draw.text((left + 4, top + 2), "identical", fill="black")
    for k, (label, speed, db) in enumerate(points):
        x = left + plot_w * speed / x_max
        y = top + plot_h * (1 - ((y_max if db is None else db) - y_min) / (y_max - y_min))
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(52, 101, 164))
        draw.text((x + 6, y - 6), str(k + 1), fill="black")
        draw.text((left + plot_w + 12, top + 14 * k), f"{k + 1}: {label}" + (" (identical)" if db is None else ""), fill="black")
    image.save(path)


def write_report(results: dict, out: Path) -> None:
    (out / "report.md").write_text(markdown(results), encoding="utf-8")
    if results["rows"]:
        chart(results, out / "report.png")
    else:
        Image.fromarray(np.full((40, 300, 3), 255, np.uint8)).save(out / "report.png")
    if _variant_points(results):
        curve(results, out / "curve.png")
