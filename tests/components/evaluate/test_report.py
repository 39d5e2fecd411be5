"""The evaluation report: real HTML (no Markdown in it), everything escaped, undecodable model output named as such."""
from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from components.evaluate.config import EvaluateConfig
from components.evaluate.metrics import METRICS, aggregate
from components.evaluate.report import UNDECODABLE, display_text, markdown_text, write_report

# What the tokenizer's decode leaves of bytes that are not UTF-8: U+FFFD replacement characters.
GARBLED = b"\xff\xfe \xc3".decode("utf-8", errors="replace")
NASTY = "<script>alert(1)</script>"


class _Tree(HTMLParser):
    """Checks every element is closed in order and collects the text a browser would show."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.text, self.errors, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture
def report(tmp_path):
    questions = ["What colour is the shape?", "How many <shapes>?", "Which | side?"]
    references = [["red"], ["2"], ["left"]]
    predictions = {
        "base": [GARBLED, "", "right"],
        "sft": ["red", NASTY, "a | b"],
    }
    rows = [{"images": [Image.new("RGB", (64, 64), "red")],
             "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]}
            for q in questions]
    categories = ["colour", "count", "position"]
    results = {name: {m: aggregate(predictions[name], references, m, categories) for m in METRICS} for name in predictions}
    config = EvaluateConfig(report_samples=3)
    scores = {name: results[name][config.metric]["score"] for name in predictions}
    reasons = ["sft beats base by +0.3333 (> min_delta 0.0)", "sft trails the champion: delta -0.1000 < 0.0 & more"]
    preference = {"policy": "sft", "reference": "base", "n": 5, "beta": 0.1, "reward_accuracy": 0.56, "reward_margin": 0.0123}
    write_report(tmp_path, config, rows, predictions, references, results, scores, "sft", True, reasons, preference)
    return tmp_path


def test_html_is_real_html_with_no_markdown(report):
    page = (report / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    assert "**" not in page and "](" not in page and "\n|" not in page and "## " not in page
    assert "reward accuracy <b>0.560</b>, mean reward margin <b>+0.0123</b>" in page
    tree = _Tree()
    tree.feed(page)
    tree.close()
    assert tree.errors == [] and tree.stack == []
    assert tree.tags.count("table") == 3  # scores, by category, examples
    assert tree.tags.count("img") == 1 + 3  # the plot and one thumbnail per example


def test_everything_is_escaped_and_shows_as_written(report):
    page = (report / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    tree = _Tree()
    tree.feed(page)
    text = "".join(tree.text)
    # What a reader sees is the text itself: questions, answers and gate reasons, untouched by the markup.
    for shown in (NASTY, "How many <shapes>?", "a | b", "delta -0.1000 < 0.0 & more"):
        assert shown in text


def test_undecodable_output_is_named_not_shown_as_replacement_characters(report):
    page = (report / "report.html").read_text(encoding="utf-8")
    md = (report / "report.md").read_text(encoding="utf-8")
    assert "\ufffd" not in page and "\ufffd" not in md
    assert ('<span class="undecodable" title="the model produced bytes that are not UTF-8 text">'
            "&lt;undecodable bytes&gt;</span>") in page
    assert "&lt;undecodable bytes&gt;" in md  # renders as <undecodable bytes>


def test_markdown_table_rows_keep_their_columns(report):
    md = (report / "report.md").read_text(encoding="utf-8").splitlines()
    start = md.index("## Examples (wins and losses first)")
    table = [line for line in md[start:] if line.startswith("|")]
    unescaped_pipes = [len(re.findall(r"(?<!\\)\|", line)) for line in table]
    assert len(table) == 2 + 3 and len(set(unescaped_pipes)) == 1  # header, rule, three examples
    assert any("a \\| b" in line for line in table)
    assert any("&lt;script&gt;" in line for line in table)
    assert "reward accuracy **0.560**" in "\n".join(md)  # Markdown keeps Markdown's own emphasis


@pytest.mark.parametrize("text, shown", [
    ("red", "red"),
    ("\ufffd", UNDECODABLE),
    ("red\ufffd\ufffd", "red" + UNDECODABLE),
    ("\ufffd \ufffd\ufffd", UNDECODABLE),  # one run, spaces inside it included
    ("a\ufffd b \ufffdc", f"a{UNDECODABLE} b {UNDECODABLE}c"),
])
def test_display_text_names_each_undecodable_run_once(text, shown):
    assert display_text(text) == shown


def test_markdown_text_escapes_markup_and_flattens_lines():
    assert markdown_text("**bold** | [x](y)\nnext") == "\\*\\*bold\\*\\* \\| \\[x\\](y) next"
    assert markdown_text("<b> & _") == "&lt;b&gt; &amp; \\_"
