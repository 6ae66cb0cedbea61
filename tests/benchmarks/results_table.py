"""Regenerate the results tables (docs/results.md) from a benchmark results.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def plural(n: int, word: str) -> str:
    """'1 thread', '2 threads'."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def _pm(row: dict, key: str) -> str:
    """mean ± std when the row has a std for `key`."""
    if row.get(key) is None:
        return "n/a"
    std = row.get(key + "_std")
    return f"{row[key]:.3f} ± {std:.3f}" if std is not None else f"{row[key]:.3f}"


def _val(row: dict) -> str:
    """Validation image / pixel AUROC / AUPRO, and for a reconstructor the share of the validation normals'
    feature variation it explains ("EV"; a baseline has none)."""
    v = row.get("validation") or {}
    text = " / ".join(_f(v.get(k)) for k in ("image_auroc", "pixel_auroc", "aupro"))
    return text + (f" · EV {v['explained_variance']:.2f}" if v.get("explained_variance") is not None else "")


def _best_baseline(baselines: dict, key: str) -> tuple[str, float | None]:
    if not baselines:
        return "not measured", None
    name = max(baselines, key=lambda m: baselines[m].get(key) or 0.0)
    return name, baselines[name][key]


def render(r: dict) -> str:
    commands = r.get("commands") or [r.get("command", "make bench")]
    load = r["machine"].get("load_average")
    shared = f"a shared machine, load average {load:.0f} at the start" if load is not None else "a shared machine"
    several = " (each writing its sections of one results file, same machine, same code)" if len(commands) > 1 else ""
    lines = [f"Measured by {'; '.join(f'`{c}`' for c in commands)}{several} on {r['date'][:10]} "
             f"({plural(r['machine']['cpus'], 'CPU thread')}, no GPU, {shared}). Magnetic Tile, method-doc protocol "
             "(seeded 80/20 split of MT_Free, all defect images in test), 256 px, pixel metrics at 256×256. Choices "
             "belong to the validation "
             "columns (validation normals and synthetic defects painted on them), never to the test set."]
    for note in r.get("notes", []):  # what the run's own numbers cannot say (how it was run)
        lines += ["", note]
    mt = r.get("magnetic_tile")
    if mt and mt.get("adtr_runs"):
        a, base = mt.get("adtr"), mt.get("baselines", {})
        lines += ["", "| model | image AUROC | pixel AUROC | AUPRO (FPR≤0.3) | validation img / px / PRO | "
                  "training | images/s batch 1 / 8 | size on disk | peak RAM (inference) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        if a:
            lines.append(f"| **ADTR, edge default** (mean ± std, {len(a['seeds'])} seeds) | {_pm(a, 'image_auroc')} | "
                         f"{_pm(a, 'pixel_auroc')} | {_pm(a, 'aupro')} | {_val(a)} | {a['train_seconds'] / 60:.1f} min "
                         f"({a['epochs']} epochs) | {_f(a['batch_1'], 1)} / {_f(a['batch_8'], 1)} | "
                         f"{a['model_mb']:.1f} MB | {a['peak_rss_mb']:.0f} MB |")
        for x in mt["adtr_runs"]:
            lines.append(f"| ADTR, edge default, seed {x['seed']} | {_f(x['image_auroc'])} | {_f(x['pixel_auroc'])} | "
                         f"{_f(x['aupro'])} | {_val(x)} | {x['train_seconds'] / 60:.1f} min ({x['epochs']} epochs) | "
                         f"— | {x['model_mb']:.1f} MB | — |")
        if mt.get("adtr_plus"):
            p = mt["adtr_plus"]
            lines.append(f"| {p['run']} | {_f(p['image_auroc'])} | {_f(p['pixel_auroc'])} | {_f(p['aupro'])} | — | "
                         f"+{p['finetune_seconds'] / 60:.1f} min | — | — | — |")
        u = mt.get("untrained")
        if u:
            lines.append(f"| {u['run']} | {_f(u['image_auroc'])} | {_f(u['pixel_auroc'])} | {_f(u['aupro'])} | "
                         f"{_val(u)} | none | — | — | — |")
        for _method, b in base.items():
            extra = f", shrinkage {b['shrinkage']:g}" if "shrinkage" in b else ""
            lines.append(f"| {b['run']}{extra} | {_f(b['image_auroc'])} | {_f(b['pixel_auroc'])} | {_f(b['aupro'])} | "
                         f"{_val(b)} | none (fit {b['fit_seconds']:.0f} s) | {_f(b.get('batch_1'), 1)} / "
                         f"{_f(b.get('batch_8'), 1)} | {b['size_mb']:.0f} MB | {_f(b.get('peak_rss_mb'), 0)} MB |")
        if a:
            lines += ["", "Issue targets on this run (ADTR mean over seeds; 'best baseline' is the best of the three "
                      "same-feature baselines on that metric):", "",
                      "| target | ADTR | best baseline | met |", "|---|---|---|---|"]
            for key, goal, label in (("image_auroc", 0.97, "image AUROC ≥ 0.97"),
                                     ("pixel_auroc", 0.83, "pixel AUROC ≥ 0.83"),
                                     ("aupro", 0.76, "AUPRO ≥ 0.76")):
                name, value = _best_baseline(base, key)
                met = a[key] >= goal and value is not None and a[key] >= value
                lines.append(f"| {label} and ≥ best baseline | {a[key]:.3f} | {_f(value)} ({name}) | "
                             f"{'yes' if met else 'no'} |")
            lines.append(f"| ≥ 25 images/s at batch 8 | {a['batch_8']:.1f} | — | "
                         f"{'yes' if a['batch_8'] >= 25 else 'no'} |")
            lines.append(f"| model ≤ 100 MB | {a['model_mb']:.1f} MB | — | {'yes' if a['model_mb'] <= 100 else 'no'} |")
            lines.append(f"| normalized scores finite, < 100× threshold (MT test) | "
                         f"max {a['max_normalized_score']:.1f}× | — | "
                         f"{'yes' if a['max_normalized_score'] < 100 else 'no'} |")
            if a.get("per_type"):
                lines += ["", "ADTR (seed " + str(a["seeds"][0]) + ") image / pixel AUROC per defect type: "
                          + ", ".join(f"{k} {_f(v)} / {_f(a['per_type_pixel'].get(k))}"
                                      for k, v in a["per_type"].items()) + "."]
        curve = mt["adtr_runs"][0].get("curve")
        if curve:
            flat = list(base.values()) + ([u] if u else [])
            lines += ["", "AUROC against training time (seed " + str(mt["adtr_runs"][0]["seed"]) + ", scorer refitted "
                      "at each point; pixel AUROC on a 1/16 pixel grid). The training-free models are flat lines: " +
                      "; ".join(f"{b['run']} {_f(b['image_auroc'])} / {_f(b['pixel_auroc'])}" for b in flat) + ".", "",
                      "| epoch | training min | validation image AUROC | image AUROC | pixel AUROC |",
                      "|---|---|---|---|---|"]
            lines += [f"| {p['epoch']} | {p['train_minutes']:.1f} | {_f(p.get('validation_image_auroc'))} | "
                      f"{_f(p['image_auroc'])} | {_f(p['pixel_auroc'])} |" for p in curve]
    elpv = r.get("elpv")
    if elpv:
        methods = list(next(iter(elpv.values()))["baselines"])
        lines += ["", "ELPV solar cells (p=0 vs p=1 image AUROC; ADTR mean ± std over its seeds):", "",
                  "| cells | ADTR | " + " | ".join(methods) + " | ADTR p=2/3 | ADTR p=1/3 | max normalized score |",
                  "|---" * (len(methods) + 5) + "|"]
        for cell, e in elpv.items():
            by = e["adtr_by_probability"]
            lines.append(f"| {cell} | {_pm(e['adtr'], 'image_auroc')} | " +
                         " | ".join(_f(e["baselines"][m]["image_auroc"]) for m in methods) +
                         f" | {_f(by.get('p=2/3'))} | {_f(by.get('p=1/3'))} | {e['max_normalized_score']:.1f}× |")
    abl = r.get("ablations") or {}
    if abl.get("scoring"):
        lines += ["", "Scoring choices, rescoring the seed-0 model (each variant refits its scorer and thresholds "
                  "as `train` does; choose on the validation columns, never the test ones):", "",
                  "| variant | validation img / px / PRO | test image AUROC | test pixel AUROC | test AUPRO |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['run']} | {_val(x)} | {_f(x['image_auroc'])} | {_f(x['pixel_auroc'])} | {_f(x['aupro'])} |"
                  for x in abl["scoring"]]
    if abl.get("training"):
        lines += ["", "Training variants (each gets the same time budget, so 'epochs' shows its cost; default "
                  "scoring):", "",
                  "| variant | validation img / px / PRO | test image AUROC | test pixel AUROC | test AUPRO | epochs |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {x['run']} | {_val(x)} | {_f(x['image_auroc'])} | {_f(x['pixel_auroc'])} | {_f(x['aupro'])} | "
                  f"{x.get('epochs', '—')} |" for x in abl["training"]]
    hr = r.get("highres")
    if hr:
        s = hr["summary"]
        lines += ["", f"Small defects on large images: 2×2 mosaics of Magnetic Tile tiles at about native resolution "
                  f"(640×640, one defect tile per anomalous mosaic; {s['train']} train, {s['test']} test), built by "
                  "the benchmark from the same splits:", "",
                  "| model | image AUROC | pixel AUROC | AUPRO | validation img / px / PRO | training "
                  "| images/s batch 1 / 8 | size |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['run']} | {_f(x['image_auroc'])} | {_f(x['pixel_auroc'])} | {_f(x['aupro'])} | {_val(x)} | "
                  f"{x['train_seconds'] / 60:.1f} min | {_f(x['batch_1'], 1)} / {_f(x['batch_8'], 1)} | "
                  f"{x['model_mb']:.0f} MB |"
                  for x in hr["rows"]]
    sp = r.get("speed")
    if sp:
        lines += ["", "| speed (CPU) | value |", "|---|---|",
                  f"| backbone features/s | {_f(sp.get('backbone_images_per_second'), 1)} |",
                  f"| training s/epoch, cached features | {_f(sp['train_seconds_per_epoch_cached'], 1)} |",
                  f"| training s/epoch, features recomputed | {_f(sp['train_seconds_per_epoch_uncached'], 1)} |",
                  f"| cache speed-up (same run) | {_f(sp['cache_speedup'], 1)}× |"]
    return "\n".join(lines)


def merge_results(parts: list[dict]) -> dict:
    """Several benchmark processes' results.json as one: sections side by side, the Magnetic Tile
    section's parts (ADTR runs from one, baselines from another) joined; every number unchanged."""
    merged = dict(parts[0])
    merged["commands"] = [p.get("command", "?") for p in parts]
    for part in parts[1:]:
        for key, value in part.items():
            if key in ("date", "command", "machine", "settings"):
                continue
            if key == "magnetic_tile" and key in merged:
                merged[key] = {**merged[key], **{k: v for k, v in value.items() if k not in merged[key]}}
            elif key not in merged:
                merged[key] = value
    return merged


def update_readme(readme: Path, results: dict) -> None:
    update_section(readme, "bench", render(results))


def update_section(readme: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} … {end} section")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{body}\n{end}{tail}")


if __name__ == "__main__":
    # results_table.py docs/results.md results.json [more results.json ...] [--out merged.json]
    args = sys.argv[1:]
    out = Path(args.pop(args.index("--out") + 1)) if "--out" in args else None
    args = [a for a in args if a != "--out"]
    results = merge_results([json.loads(Path(p).read_text()) for p in args[1:]])
    if out:
        out.write_text(json.dumps(results, indent=2))
    update_readme(Path(args[0]), results)
