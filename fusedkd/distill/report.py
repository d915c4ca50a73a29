"""The results table: perplexity, top-1 next-token agreement with the teacher, KL to the teacher."""

from __future__ import annotations


def format_table(rows: list[tuple], *, tokens: int) -> str:
    """A Markdown table of ``(model, perplexity, agreement or None, KL or None)`` rows (agreement in %, KL in
    nats per token, "-" where it does not apply), and the number of held-out target tokens evaluated."""
    header = ("model", "perplexity", "top-1 agreement with teacher", "KL(teacher ‖ model)")
    cells = [header] + [
        (
            name,
            f"{ppl:.2f}",
            "-" if agree is None else f"{100 * agree:.1f}%",
            "-" if kl is None else f"{kl:.4f}",
        )
        for name, ppl, agree, kl in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join([row[0].ljust(widths[0]), *map(str.rjust, row[1:], widths[1:])]) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|")
    return "\n".join(lines) + f"\n\nevaluated on {tokens:,} held-out target tokens"
