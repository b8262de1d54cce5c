"""One way the benchmark scripts print a result table: Markdown for BENCHMARKS.md (the first
`text_columns` columns left-aligned, the figures right-aligned), or aligned plain text."""
from __future__ import annotations


def print_table(title: str, header: list[str], rows: list[list[str]], markdown: bool, text_columns: int = 1) -> None:
    if markdown:
        print(f"**{title}**\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * text_columns + "---:|" * (len(header) - text_columns))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    print(title)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
