"""Rendering, the only place that formats results: text tables for people, JSON for programs.

    render.py   reports and plans as text or JSON documents
    tables.py   plain columns when piped, fitted to the width (folded names) on a terminal
    escape.py   control characters in names escaped for the terminal
    diagnosis.py  sparklines, histograms and health findings as text and JSON
    html.py     the report page (matplotlib's inline SVG)
"""
