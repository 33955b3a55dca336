"""hw3lib.viz: what the figures say (labels, lines, scales), read back from matplotlib's objects."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from hw3lib import viz  # noqa: E402


def test_score_histogram_marks_each_score_with_a_labelled_line_pointing_inwards():
    scores = np.linspace(0.2, 3.0, 50)
    fig = viz.score_histograms({"captions": scores}, marks={"top-1": 3.0, "last-1": 0.2})
    ax = fig.axes[0]
    lines = sorted(line.get_xdata()[0] for line in ax.lines)
    assert lines == [0.2, 3.0]
    labels = {t.get_text().strip(): (t.get_position()[0], t.get_horizontalalignment()) for t in ax.texts}
    assert labels == {"top-1": (3.0, "right"), "last-1": (0.2, "left")}
    assert "mean 1.600" in ax.get_legend().get_texts()[0].get_text()
