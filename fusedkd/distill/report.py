"""The results table: perplexity, next-token agreement with the teacher, KL to the teacher."""

from __future__ import annotations

from collections.abc import Sequence

Row = tuple[str, float, float | None, float | None]  # (model, perplexity, agreement, KL(teacher || model))


def format_table(rows: Sequence[Row], *, tokens: int, title: str | None = None) -> str:
    """A Markdown table of evaluation rows (agreement in %, KL in nats per token; "-" where not applicable).

    Example:
        >>> print(format_table([("teacher", 12.345, None, None), ("student", 20.0, 0.5, 0.25)], tokens=1000))
        | model   | perplexity | top-1 agreement with teacher | KL(teacher ‖ model) |
        |---------|-----------:|-----------------------------:|--------------------:|
        | teacher |      12.35 |                            - |                   - |
        | student |      20.00 |                        50.0% |              0.2500 |
        <BLANKLINE>
        evaluated on 1,000 held-out target tokens
    """
    header = ("model", "perplexity", "top-1 agreement with teacher", "KL(teacher ‖ model)")
    cells = [
        (
            name,
            f"{ppl:.2f}",
            "-" if agreement is None else f"{100 * agreement:.1f}%",
            "-" if kl is None else f"{kl:.4f}",
        )
        for name, ppl, agreement, kl in rows
    ]
    widths = [max(len(header[i]), *(len(row[i]) for row in cells)) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        padded = [values[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(values[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    lines = ([title, ""] if title else []) + [line(header), rule] + [line(row) for row in cells]
    return "\n".join(lines) + f"\n\nevaluated on {tokens:,} held-out target tokens"
