"""The HTML pieces of `vaegen show`'s gallery: one self-contained page, every image inline (a data: URI).

Counts on the page carry `data-count` attributes and a small inline script sets `data-images-loaded` on
<body> once the page has loaded, so a headless browser can check what a person would see."""
from __future__ import annotations

import base64
import dataclasses
import html

import numpy as np

from vae_core.images import png_bytes

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}dd{margin:0}
table.settings{border-collapse:collapse}table.settings td{padding:.15em .8em .15em 0;vertical-align:top}
table.settings td.help{color:#666;font-size:.9em}
table.settings td:first-child,table.settings td:nth-child(2){white-space:nowrap}
.banner{background:#fff3cd;border:1px solid #e0c068;padding:.6em 1em;font-weight:600}
.banner.failed{background:#f8d7da;border-color:#d08088}
.sheet{display:grid;grid-template-columns:repeat(8,max-content);gap:3px;margin:.3em 0 1em}
.sheet img,.pair img{width:56px;height:56px;image-rendering:pixelated;background:#000}
.pair{display:inline-flex;flex-direction:column;gap:2px;margin:0 4px 6px 0}
figure{margin:.4em 0 1.2em}figcaption{color:#444;font-size:.9em;margin-top:.3em;max-width:640px}
img.plot{max-width:100%}img.grid{width:320px;image-rendering:pixelated}
.epochs{display:flex;flex-wrap:wrap;gap:10px}.epochs figure{margin:0}.epochs img{width:160px;image-rendering:pixelated}
.epochs figcaption{text-align:center}
code,pre{background:#f4f4f4;padding:.1em .3em}"""

# Sets <body data-images-loaded="N" data-images-total="M"> after load: N counts images that decoded.
SCRIPT = """window.addEventListener('load',function(){var all=document.images,ok=0;
for(var i=0;i<all.length;i++){if(all[i].complete&&all[i].naturalWidth>0)ok++;}
document.body.dataset.imagesLoaded=ok;document.body.dataset.imagesTotal=all.length;});"""


def esc(value: object) -> str:
    return html.escape(str(value))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def img(image: np.ndarray, alt: str) -> str:
    return f'<img src="{data_uri(png_bytes(image))}" alt="{esc(alt)}" title="{esc(alt)}">'


def figure(png: bytes, alt: str, caption: str, css: str = "plot") -> str:
    """An image with its caption (what the picture is, and what its rows are)."""
    return (f'<figure><img class="{css}" src="{data_uri(png)}" alt="{esc(alt)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def facts(items: list[tuple[str, str, int | None]]) -> str:
    """A definition list; an item with a count gets data-count (what tests and scripts read)."""
    rows = []
    for label, text, count in items:
        attrs = f' id="{label.lower().replace(" ", "-")}" data-count="{count}"' if count is not None else ""
        rows.append(f"<dt>{esc(label)}</dt><dd{attrs}>{esc(text)}</dd>")
    return f"<dl>{''.join(rows)}</dl>"


def settings_table(config_class: type, values: dict, css_id: str) -> str:
    """A config's settings as the flags that set them (`--lr 0.001`) with each flag's help; fields without a flag
    are named in words. Values the class does not declare (a newer vaegen's) are shown under their own key."""
    rows = []
    declared = {f.name: f for f in dataclasses.fields(config_class)}
    for key, value in values.items():
        if isinstance(value, dict):
            continue                                    # a nested config: shown in its own table
        meta = declared[key].metadata if key in declared else {}
        label = meta.get("flag") or key.replace("_", " ")
        shown = "-" if value is None or value == "" else (", ".join(map(str, value)) if isinstance(value, list)
                                                           else value)
        rows.append(f"<tr><td><code>{esc(label)}</code></td><td>{esc(shown)}</td>"
                    f"<td class=\"help\">{esc(meta.get('help', ''))}</td></tr>")
    return f'<table class="settings" id="{css_id}">{"".join(rows)}</table>'


def page(title: str, body: list[str]) -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body>"
            f"<h1>{esc(title)}</h1>{''.join(body)}</body></html>")
