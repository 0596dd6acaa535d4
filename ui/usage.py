"""The usage page: the usage report's table, and a chart of tokens per day by model."""

from typing import NamedTuple

from flask import render_template

from observability.usage_report import usage_report
from schemas import USAGE_GROUP_KEYS, UsageQuerySchema
from storage.usage import GROUP_FIELDS
from ui.console import caller, query_values, ui_bp

# Told apart by colour-blind readers too (Okabe and Ito's palette); more models than colours repeat them.
MODEL_COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
UNKNOWN_MODEL = "unknown model"
CHART_WIDTH, CHART_HEIGHT = 640, 240
PLOT_LEFT, PLOT_TOP, PLOT_BOTTOM = 64, 12, 208  # room for the token axis's numbers and the days under the bars
MOST_DAY_LABELS = 10  # beyond, only every n-th day is named under its bar (each bar still has its title)


class Segment(NamedTuple):
    model: str
    colour: str
    tokens: int
    y: float
    height: float


class DayBar(NamedTuple):
    day: str
    x: float
    tokens: int
    segments: list
    labelled: bool


def tokens_per_day_by_model(rows):
    """{day: {model: input and output tokens}} of report rows grouped by day and model."""
    days = {}
    for row in rows:
        model = row["model"] or UNKNOWN_MODEL
        tokens = days.setdefault(row["day"].isoformat(), {})
        tokens[model] = tokens.get(model, 0) + row["input_tokens"] + row["output_tokens"]
    return days


def tokens_chart(rows):
    """The chart's geometry: a stacked bar per day with tokens, a colour per model, the axis's top."""
    days = {day: models for day, models in tokens_per_day_by_model(rows).items() if sum(models.values())}
    models = sorted({model for per_model in days.values() for model in per_model})
    colours = {model: MODEL_COLOURS[index % len(MODEL_COLOURS)] for index, model in enumerate(models)}
    most = max((sum(per_model.values()) for per_model in days.values()), default=0)
    slot = (CHART_WIDTH - PLOT_LEFT) / max(len(days), 1)
    label_every = -(-len(days) // MOST_DAY_LABELS)
    bars = []
    for index, (day, per_model) in enumerate(sorted(days.items())):
        bottom, segments = PLOT_BOTTOM, []
        for model in models:
            height = per_model.get(model, 0) / most * (PLOT_BOTTOM - PLOT_TOP) if most else 0
            bottom -= height
            segments.append(Segment(model, colours[model], per_model.get(model, 0), bottom, height))
        x = PLOT_LEFT + index * slot + slot * 0.15
        bars.append(DayBar(day, x, sum(per_model.values()), segments, index % label_every == 0))
    return {"bars": bars, "bar_width": slot * 0.7, "colours": colours, "most": most}


@ui_bp.get("/usage")
def usage():
    query = query_values(UsageQuerySchema())
    report = usage_report(query, caller())
    by_day_and_model = usage_report({**query, "group_by": ["day", "model"]}, caller())
    return render_template(
        "ui/usage.html",
        columns=[GROUP_FIELDS[key] for key in query["group_by"]],
        rows=report["items"],
        chart=tokens_chart(by_day_and_model["items"]),
        group_keys=USAGE_GROUP_KEYS,
        size={"width": CHART_WIDTH, "height": CHART_HEIGHT, "left": PLOT_LEFT, "top": PLOT_TOP, "bottom": PLOT_BOTTOM},
    )
