"""The evaluation report, in the two forms pipeline UIs render: Markdown (Vertex AI / KFP Markdown
visualisation) and a self-contained HTML page (images inlined), plus a bar-chart PNG."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from components.evaluate.metrics import METRICS


def _plot(scores: dict[str, float], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = list(scores)
    bars = ax.bar(names, [scores[n] for n in names], color=["#999"] + ["#3a7"] * (len(names) - 1))
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(metric)
    ax.set_title("held-out " + metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _thumbnail_png(image) -> bytes:
    image = image.copy()
    image.thumbnail((160, 160))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _question(messages) -> str:
    for message in messages:
        if message["role"] == "user":
            return " ".join(part["text"] for part in message["content"] if part.get("type") == "text" and part.get("text"))
    return ""


def pick_samples(predictions, references, candidate: str, n: int) -> list[tuple[int, str]]:
    """Indices to show: wins (candidate right, base wrong) and losses first, then the rest."""
    metric = METRICS["exact_match"]
    tagged = []
    for i, refs in enumerate(references):
        cand_ok = metric(predictions[candidate][i], refs) > 0
        base_ok = metric(predictions["base"][i], refs) > 0
        tag = "win" if cand_ok and not base_ok else "loss" if base_ok and not cand_ok else "same"
        tagged.append((("win", "loss", "same").index(tag), i, tag))
    wins = [t for t in tagged if t[2] == "win"][: max(1, n // 2)]
    losses = [t for t in tagged if t[2] == "loss"][: max(1, n // 4)]
    rest = [t for t in tagged if t[2] == "same"]
    return [(i, tag) for _, i, tag in (wins + losses + rest)[:n]]


def write_report(out: Path, config, rows, predictions, references, results, scores, candidate, passed, reasons,
                 preference: dict | None = None) -> None:
    metric = config.metric
    _plot(scores, metric, out / "scores.png")
    names = list(scores)
    base = scores["base"]
    samples = pick_samples(predictions, references, candidate, config.report_samples)
    (out / "samples").mkdir(exist_ok=True)

    md = [f"# Evaluation: {'PASSED' if passed else 'NOT PASSED'}", "", f"Candidate: **{candidate}**; primary metric: "
          f"**{metric}**; {len(references)} held-out rows.", "", "| model | " + " | ".join(sorted(METRICS)) + f" | Δ {metric} vs base |",
          "|---|" + "---|" * (len(METRICS) + 1)]
    for name in names:
        cells = [f"{results[name][m]['score']:.3f}" for m in sorted(METRICS)]
        md.append(f"| {name} | " + " | ".join(cells) + f" | {scores[name] - base:+.3f} |")
    categories = sorted({c for name in names for c in results[name][metric]["per_category"]})
    if categories:
        md += ["", f"## {metric} by category", "", "| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for cat in categories:
            md.append(f"| {cat} | " + " | ".join(f"{results[n][metric]['per_category'].get(cat, {}).get('score', 0):.3f}" for n in names) + " |")
    pref_lines = []
    if preference:
        pref_lines = [f"{preference['policy']} vs {preference['reference']} on {preference['n']} held-out preference pairs "
                      f"(beta {preference['beta']}): reward accuracy **{preference['reward_accuracy']:.3f}**, "
                      f"mean reward margin **{preference['reward_margin']:+.4f}**"]
        md += ["", "## Preference pairs (DPO implicit reward)", ""] + pref_lines
    md += ["", "## Gate", ""] + [f"- {r}" for r in reasons] + ["", "![scores](scores.png)", "", "## Examples (wins and losses first)", "",
           "| image | question | reference | " + " | ".join(names) + " | |", "|---|---|---|" + "---|" * (len(names) + 1)]

    html_rows = []
    for i, tag in samples:
        row = rows[i]
        thumbs = [_thumbnail_png(img) for img in row["images"]]
        files = []
        for k, data in enumerate(thumbs):
            name = f"samples/{i:05d}_{k}.png"
            (out / name).write_bytes(data)
            files.append(name)
        question = _question(row["messages"])
        md.append(f"| {' '.join(f'![]({f})' for f in files)} | {question} | {references[i][0]} | "
                  + " | ".join(predictions[n][i] for n in names) + f" | {tag} |")
        imgs = "".join(f'<img src="data:image/png;base64,{base64.b64encode(d).decode()}" width="96">' for d in thumbs)
        cells = "".join(f"<td>{html.escape(predictions[n][i])}</td>" for n in names)
        html_rows.append(f"<tr class='{tag}'><td>{imgs}</td><td>{html.escape(question)}</td><td>{html.escape(references[i][0])}</td>{cells}<td>{tag}</td></tr>")
    (out / "report.md").write_text("\n".join(md) + "\n")

    plot_b64 = base64.b64encode((out / "scores.png").read_bytes()).decode()
    table = "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{results[n][m]['score']:.3f}</td>" for m in sorted(METRICS))
        + f"<td>{scores[n] - base:+.3f}</td></tr>" for n in names
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vlmtune evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
tr.win{{background:#e8f6ec}}tr.loss{{background:#fbeaea}}</style></head><body>
<h1>Evaluation: {'PASSED' if passed else 'NOT PASSED'}</h1>
<p>Candidate <b>{html.escape(candidate)}</b>, primary metric <b>{metric}</b>, {len(references)} held-out rows.</p>
<table><tr><th>model</th>{''.join(f'<th>{m}</th>' for m in sorted(METRICS))}<th>Δ {metric} vs base</th></tr>{table}</table>
{''.join(f'<h2>Preference pairs (DPO implicit reward)</h2><p>{html.escape(line)}</p>' for line in pref_lines)}
<h2>Gate</h2><ul>{''.join(f'<li>{html.escape(r)}</li>' for r in reasons)}</ul>
<img src="data:image/png;base64,{plot_b64}">
<h2>Examples (wins and losses first)</h2>
<table><tr><th>image</th><th>question</th><th>reference</th>{''.join(f'<th>{html.escape(n)}</th>' for n in names)}<th></th></tr>{''.join(html_rows)}</table>
</body></html>"""
    (out / "report.html").write_text(page)
