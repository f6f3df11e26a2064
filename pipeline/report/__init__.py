"""The report: paper-shaped tables (Markdown, LaTeX), figures and a self-contained HTML page."""
