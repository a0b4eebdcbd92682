"""The run report's page: its layout and style, around the script of
:mod:`asyncflow.report_script` and the data :mod:`asyncflow.report_html` builds.

Everything is inline (no CDN, no web font, no image) so that the file opens
offline: a report is read on laptops that cannot reach the cluster it came
from.
"""

from __future__ import annotations

from .report_script import SCRIPT

__all__ = ["PAGE"]

_STYLE = """
:root{--fg:#1f2933;--muted:#616e7c;--line:#d9e2ec;--bg:#f7f9fb;--crit:#7c3aed}
*{box-sizing:border-box}
body{margin:0;padding:16px 24px;font:14px/1.4 system-ui,sans-serif;color:var(--fg);
background:var(--bg)}
h1{font-size:20px;margin:0 12px 0 0;display:inline}
h2{font-size:15px;margin:0 0 8px}h2 small{font-weight:normal;color:var(--muted)}
header{margin-bottom:12px}#note{color:var(--muted);margin:4px 0 0}
section{background:#fff;border:1px solid var(--line);border-radius:6px;
padding:12px;margin:0 0 12px}
.row{display:flex;gap:12px;flex-wrap:wrap}.row>section{flex:1 1 420px}
.badge{padding:2px 8px;border-radius:10px;color:#fff;font-size:12px;
vertical-align:middle}
#summary{display:flex;flex-wrap:wrap;gap:8px}
.card{border:1px solid var(--line);border-radius:6px;padding:6px 12px;min-width:90px}
.card b{display:block;font-size:18px}.card span{color:var(--muted);font-size:12px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid var(--line);
vertical-align:top}
td.err{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;
word-break:break-word;color:#a61e1e}
.bar{display:inline-block;width:120px;height:10px;background:var(--line);
margin-right:6px}.bar i{display:block;height:100%;background:#3b82f6}
.scroll{overflow:auto;max-height:560px;border:1px solid var(--line)}
.legend span{display:inline-block;margin-right:12px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;
vertical-align:middle}
a.uid{color:inherit;cursor:pointer;text-decoration:underline dotted}
#dag text{font-size:11px;pointer-events:none}
#dag .node{cursor:pointer}#dag .edge{fill:none;stroke:#a0aec0;stroke-width:1}
#dag .edge.crit{stroke:var(--crit);stroke-width:3}
#dag .node.crit>rect:first-child{stroke:var(--crit);stroke-width:3}
#timeline-wrap{position:relative;overflow:auto;max-height:640px}
#timeline{display:block;cursor:crosshair}
#tip{position:fixed;pointer-events:none;background:#1f2933;color:#fff;
padding:4px 8px;border-radius:4px;font-size:12px;max-width:480px;z-index:9;
white-space:pre-wrap}
#details{position:fixed;right:16px;bottom:16px;width:440px;max-height:60vh;
overflow:auto;background:#fff;border:1px solid var(--line);border-radius:6px;
padding:10px;box-shadow:0 4px 16px rgba(0,0,0,.15)}
#details button{float:right}
"""

PAGE = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>%%TITLE%%</title>
<style>"""
    + _STYLE
    + """</style></head><body>
<header><h1 id="title"></h1><span id="status" class="badge"></span>
<p id="note"></p></header>
<section><div id="summary"></div></section>
<div class="row">
<section><h2>Utilisation <small>busy time / (slots &times; makespan)</small></h2>
<table id="utilisation"></table></section>
<section><h2>Failures</h2><div id="failures"></div></section>
</div>
<section><h2>DAG <small id="dag-mode"></small></h2>
<div class="legend" id="legend"></div><div id="dag" class="scroll"></div></section>
<section><h2>Timeline <small>one row per backend slot; wheel to zoom, drag to pan,
double-click to reset, click a bar for details</small></h2>
<div id="timeline-wrap"><canvas id="timeline"></canvas></div></section>
<aside id="details" hidden></aside><div id="tip" hidden></div>
<script type="application/json" id="report-data">%%DATA%%</script>
<script>"""
    + SCRIPT
    + """</script></body></html>
"""
)
