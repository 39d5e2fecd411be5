"""The evaluation report, in the two forms pipeline UIs render: Markdown (Vertex AI / KFP Markdown
visualisation, images beside it in ``samples/``) and a self-contained HTML page (images inlined), plus a
bar-chart PNG.

Both are built from the same facts and each is written in its own markup: the HTML has no Markdown in it
(``<b>0.560</b>``, not ``**0.560**``). Every piece of text that comes from data, a model or the user (questions,
references, answers, model and category names, gate reasons) is escaped for the format it lands in, so an
answer such as ``<b>`` or ``a | b`` shows as written and cannot break the page or the table. Bytes a model
produced that are not UTF-8 text arrive as U+FFFD replacement characters; they are shown as
``<undecodable bytes>``, not as a row of ``�``.
"""
from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from components.evaluate.metrics import METRIC_DESCRIPTIONS, METRICS

UNDECODABLE = "<undecodable bytes>"
# A run of replacement characters, spaces between them included: one marker per run, not one per byte.
_UNDECODABLE_RUN = re.compile("\ufffd(?:[\\s\ufffd]*\ufffd)?")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~#])")


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


def _pieces(text: str) -> list[tuple[bool, str]]:
    """``text`` split into (is_undecodable, piece): runs of U+FFFD become one undecodable piece each."""
    out, at = [], 0
    for match in _UNDECODABLE_RUN.finditer(text):
        if match.start() > at:
            out.append((False, text[at:match.start()]))
        out.append((True, UNDECODABLE))
        at = match.end()
    if at < len(text):
        out.append((False, text[at:]))
    return out


def display_text(text: str) -> str:
    """Plain text as the report shows it: each run of replacement characters as ``<undecodable bytes>``."""
    return "".join(piece for _, piece in _pieces(str(text)))


def html_text(text: str) -> str:
    """``text`` as HTML: escaped, undecodable runs marked (greyed, with an explanation on hover)."""
    return "".join(
        f'<span class="undecodable" title="the model produced bytes that are not UTF-8 text">{html.escape(piece)}</span>'
        if undecodable else html.escape(piece)
        for undecodable, piece in _pieces(str(text))
    )


def markdown_text(text: str) -> str:
    """``text`` for a Markdown table cell: one line, HTML-escaped, Markdown's special characters backslashed."""
    flat = " ".join(display_text(text).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(flat, quote=False))


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
    """``report.md``, ``report.html``, ``scores.png`` and ``samples/*.png`` in ``out``."""
    metric = config.metric
    _plot(scores, metric, out / "scores.png")
    names = list(scores)
    base = scores["base"]
    metric_names = sorted(METRICS)
    verdict = "PASSED" if passed else "NOT PASSED"
    categories = sorted({c for name in names for c in results[name][metric]["per_category"]})

    def category_score(name: str, category: str) -> str:
        return f"{results[name][metric]['per_category'].get(category, {}).get('score', 0):.3f}"

    # The examples: thumbnails written once, used by both forms.
    (out / "samples").mkdir(exist_ok=True)
    examples = []
    for i, tag in pick_samples(predictions, references, candidate, config.report_samples):
        row = rows[i]
        thumbs = [_thumbnail_png(img) for img in row["images"]]
        files = []
        for k, data in enumerate(thumbs):
            name = f"samples/{i:05d}_{k}.png"
            (out / name).write_bytes(data)
            files.append(name)
        examples.append({"tag": tag, "thumbs": thumbs, "files": files, "question": _question(row["messages"]),
                         "reference": references[i][0], "answers": [predictions[n][i] for n in names]})

    # ---- Markdown ----------------------------------------------------------------------------------------
    md = [f"# Evaluation: {verdict}", "",
          f"Candidate: **{markdown_text(candidate)}**; primary metric: **{markdown_text(metric)}** "
          f"({markdown_text(METRIC_DESCRIPTIONS[metric])}); "
          f"{len(references)} held-out rows.", "",
          "| model | " + " | ".join(markdown_text(m) for m in metric_names) + f" | Δ {markdown_text(metric)} vs base |",
          "|---|" + "---|" * (len(metric_names) + 1)]
    for name in names:
        cells = [f"{results[name][m]['score']:.3f}" for m in metric_names]
        md.append(f"| {markdown_text(name)} | " + " | ".join(cells) + f" | {scores[name] - base:+.3f} |")
    if categories:
        md += ["", f"## {markdown_text(metric)} by category", "",
               "| category | " + " | ".join(markdown_text(n) for n in names) + " |", "|---|" + "---|" * len(names)]
        for cat in categories:
            md.append(f"| {markdown_text(cat)} | " + " | ".join(category_score(n, cat) for n in names) + " |")
    if preference:
        md += ["", "## Preference pairs (DPO implicit reward)", "",
               f"{markdown_text(preference['policy'])} vs {markdown_text(preference['reference'])} on "
               f"{preference['n']} held-out preference pairs (beta {preference['beta']}): reward accuracy "
               f"**{preference['reward_accuracy']:.3f}**, mean reward margin **{preference['reward_margin']:+.4f}**"]
    md += ["", "## Gate", ""] + [f"- {markdown_text(r)}" for r in reasons]
    md += ["", "![scores](scores.png)", "", "## Examples (wins and losses first)", "",
           "| image | question | reference | " + " | ".join(markdown_text(n) for n in names) + " | |",
           "|---|---|---|" + "---|" * (len(names) + 1)]
    for ex in examples:
        md.append(f"| {' '.join(f'![]({f})' for f in ex['files'])} | {markdown_text(ex['question'])} | "
                  f"{markdown_text(ex['reference'])} | " + " | ".join(markdown_text(a) for a in ex["answers"])
                  + f" | {ex['tag']} |")
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    # ---- HTML --------------------------------------------------------------------------------------------
    e = html.escape
    primary = {m: ' class="primary"' if m == metric else "" for m in metric_names}
    header = "".join(f'<th title="{e(METRIC_DESCRIPTIONS[m])}"{primary[m]}>{e(m)}</th>' for m in metric_names)
    score_rows = "".join(
        f"<tr><td>{html_text(n)}</td>"
        + "".join(f"<td{primary[m]}>{results[n][m]['score']:.3f}</td>" for m in metric_names)
        + f"<td>{scores[n] - base:+.3f}</td></tr>" for n in names
    )
    parts = [
        f"<h1>Evaluation: {verdict}</h1>",
        f"<p>Candidate <b>{html_text(candidate)}</b>, primary metric <b>{e(metric)}</b> "
        f"({e(METRIC_DESCRIPTIONS[metric])}), {len(references)} held-out rows.</p>",
        f"<table><tr><th>model</th>{header}<th>Δ {e(metric)} vs base</th></tr>{score_rows}</table>",
    ]
    if categories:
        parts.append(
            f"<h2>{e(metric)} by category</h2><table><tr><th>category</th>"
            + "".join(f"<th>{html_text(n)}</th>" for n in names) + "</tr>"
            + "".join(f"<tr><td>{html_text(cat)}</td>" + "".join(f"<td>{category_score(n, cat)}</td>" for n in names)
                      + "</tr>" for cat in categories)
            + "</table>")
    if preference:
        parts.append(
            "<h2>Preference pairs (DPO implicit reward)</h2>"
            f"<p>{html_text(preference['policy'])} vs {html_text(preference['reference'])} on {preference['n']} "
            f"held-out preference pairs (beta {e(str(preference['beta']))}): reward accuracy "
            f"<b>{preference['reward_accuracy']:.3f}</b>, mean reward margin <b>{preference['reward_margin']:+.4f}</b></p>")
    parts.append("<h2>Gate</h2><ul>" + "".join(f"<li>{html_text(r)}</li>" for r in reasons) + "</ul>")
    plot_b64 = base64.b64encode((out / "scores.png").read_bytes()).decode()
    parts.append(f'<img src="data:image/png;base64,{plot_b64}" alt="held-out {e(metric)} per model">')
    example_rows = "".join(
        f'<tr class="{ex["tag"]}"><td>'
        + "".join(f'<img src="data:image/png;base64,{base64.b64encode(d).decode()}" width="96" alt="">' for d in ex["thumbs"])
        + f"</td><td>{html_text(ex['question'])}</td><td>{html_text(ex['reference'])}</td>"
        + "".join(f"<td>{html_text(a)}</td>" for a in ex["answers"]) + f"<td>{ex['tag']}</td></tr>"
        for ex in examples
    )
    parts.append("<h2>Examples (wins and losses first)</h2><table><tr><th>image</th><th>question</th><th>reference</th>"
                 + "".join(f"<th>{html_text(n)}</th>" for n in names) + f"<th></th></tr>{example_rows}</table>")
    page = ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>vlmtune evaluation</title>\n'
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px}tr.win{background:#e8f6ec}tr.loss{background:#fbeaea}"
            ".primary{font-weight:bold}.undecodable{color:#888;font-style:italic}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    (out / "report.html").write_text(page, encoding="utf-8")
