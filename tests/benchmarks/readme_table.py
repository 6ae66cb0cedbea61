"""Regenerate the README's results section from a benchmark results.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def render(r: dict) -> str:
    lines = [f"Measured by `make bench` on {r['date'][:10]} ({r['machine']['cpus']} CPU threads, no GPU). "
             "Magnetic Tile, method-doc protocol (seeded 80/20 split of MT_Free, all defect images in "
             "test), 256 px, pixel metrics at 256×256."]
    mt = r.get("magnetic_tile")
    if mt:
        a, b = mt["adtr"], mt["baseline"]
        lines += ["", "| model | image AUROC | pixel AUROC | AUPRO (FPR≤0.3) | F1 @ threshold | images/s (batch 8) | training |",
                  "|---|---|---|---|---|---|---|",
                  f"| ADTR, edge default | {_f(a['image_auroc'])} | {_f(a['pixel_auroc'])} | {_f(a['aupro'])} | "
                  f"{_f(a.get('f1'))} | {_f(a.get('images_per_second'), 1)} | {a['epochs']} epochs, {a['train_seconds'] / 60:.1f} min |",
                  *([f"| {mt['adtr_plus']['run']} on top | {_f(mt['adtr_plus']['image_auroc'])} | "
                     f"{_f(mt['adtr_plus']['pixel_auroc'])} | {_f(mt['adtr_plus']['aupro'])} | — | — | "
                     f"+{mt['adtr_plus']['finetune_seconds'] / 60:.1f} min |"] if mt.get("adtr_plus") else []),
                  f"| nearest-neighbour patch memory (same features) | {_f(b['image_auroc'])} | {_f(b['pixel_auroc'])} | "
                  f"{_f(b['aupro'])} | — | {_f(b.get('images_per_second'), 1)} | none ({b['memory_patches']} patches) |"]
        if a.get("per_type"):
            lines += ["", "ADTR image AUROC per defect type: " + ", ".join(
                f"{k} {_f(v)}" for k, v in a["per_type"].items()) + "."]
        if a.get("curve"):
            lines += ["", "AUROC against training time (same run; pixel AUROC on a 1/16 pixel grid):", "",
                      "| epoch | training min | image AUROC | pixel AUROC |", "|---|---|---|---|"]
            lines += [f"| {p['epoch']} | {p['train_minutes']:.1f} | {_f(p['image_auroc'])} | {_f(p['pixel_auroc'])} |"
                      for p in a["curve"]]
    elpv = r.get("elpv")
    if elpv:
        if r.get("elpv_note"):
            lines += ["", r["elpv_note"]]
        lines += ["", "| ELPV (p=0 vs p=1) | ADTR image AUROC | baseline image AUROC | ADTR p=2/3 | ADTR p=1/3 |",
                  "|---|---|---|---|---|"]
        for cell, e in elpv.items():
            by = e["adtr_by_probability"]
            lines.append(f"| {cell} | {_f(e['adtr_image_auroc'])} | {_f(e['baseline_image_auroc'])} | "
                         f"{_f(by.get('p=2/3'))} | {_f(by.get('p=1/3'))} |")
    abl = r.get("ablations")
    if abl and r.get("ablations_note"):
        lines += ["", r["ablations_note"]]
    if abl:
        lines += ["", "Ablations (Magnetic Tile; each trained variant gets the same 3-minute budget, so "
                  "'epochs' shows its cost; blur rows rescore one model):", "",
                  "| variant | image AUROC | pixel AUROC | AUPRO | epochs in budget |", "|---|---|---|---|---|"]
        lines += [f"| {x['run']} | {_f(x['image_auroc'])} | {_f(x['pixel_auroc'])} | {_f(x.get('aupro'))} | "
                  f"{x.get('epochs', '—')} |" for x in abl]
    sp = r.get("speed")
    if sp:
        by = sp.get("inference_images_per_second_by_batch") or {}
        lines += ["", "| speed (CPU) | value |", "|---|---|",
                  f"| backbone features/s | {_f(sp.get('backbone_images_per_second'), 1)} |",
                  f"| training s/epoch, cached features | {_f(sp['train_seconds_per_epoch_cached'], 1)} |",
                  f"| training s/epoch, features recomputed | {_f(sp['train_seconds_per_epoch_uncached'], 1)} |",
                  f"| cache speed-up (same run) | {_f(sp['cache_speedup'], 1)}× |"]
        lines += [f"| inference images/s, batch {k} | {_f(v, 1)} |" for k, v in by.items()]
        lines.append(f"| peak memory of the benchmark process | {sp['peak_rss_mb']:.0f} MB |")
    return "\n".join(lines)


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
    update_readme(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
