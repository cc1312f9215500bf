"""The compression Pareto plots read without the code: axis titles in words, tick labels on
the size axis whatever its range, and a legend naming each technique instead of labels drawn
beside points (which overlapped when techniques were close)."""

from __future__ import annotations

import pytest

from report.lab_log import compress_results

pytest.importorskip("matplotlib")


@pytest.fixture
def figure():
    import matplotlib.pyplot as plt

    from aidc.compress.report import pareto_figure

    fig = pareto_figure(compress_results()["models"][0])
    fig.canvas.draw()
    yield fig
    plt.close(fig)


def test_axis_titles_are_words_with_units(figure):
    latency, size = figure.axes
    assert latency.get_xlabel() == "time per batch of 256 inputs (milliseconds, measured beside fp32)"
    assert size.get_xlabel() == "size on disk (megabytes)"
    assert latency.get_ylabel() == size.get_ylabel() == "accuracy (%)"


def test_the_size_axis_has_several_readable_tick_labels_within_a_decade(figure):
    size = figure.axes[1]
    lo, hi = size.get_xlim()
    labels = [t.get_text() for t in size.get_xticklabels() if lo <= t.get_position()[0] <= hi and t.get_text()]
    assert len(labels) >= 3 and all("10^" not in t and "$" not in t for t in labels)


def test_techniques_are_named_once_in_a_legend_not_beside_points(figure):
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == [r["label"] for r in compress_results()["models"][0]["rows"]]
    assert all(not ax.texts for ax in figure.axes)  # no per-point annotations to overlap
