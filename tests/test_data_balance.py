"""KTO wants (λD·nD)/(λU·nU) in [1, 4/3]; the studio suggests weights that get there and shows where a choice sits."""
from __future__ import annotations

import pytest

from studio.data.balance import HIGH, LOW, check, ratio, suggest_weights
from studio.data.plots import gauge_figure, length_figure, marker_position
from studio.data.inspect import TokenLengths


@pytest.mark.parametrize("nd,nu", [(1, 10), (10, 1), (100, 400), (400, 100), (7, 4), (3, 997), (997, 3), (50, 49)])
def test_suggested_weights_land_in_the_kto_range(nd, nu):
    b = suggest_weights(nd, nu)
    assert LOW <= b.ratio <= HIGH
    assert b.in_range
    # the majority keeps weight 1; only the minority is weighed up
    if nd < nu:
        assert b.undesirable_weight == 1.0 and b.desirable_weight > 1.0
    elif nd > nu * HIGH:
        assert b.desirable_weight == 1.0 and b.undesirable_weight > 1.0


@pytest.mark.parametrize("nd,nu", [(10, 10), (12, 10), (13, 10)])
def test_balanced_data_keeps_weights_at_one(nd, nu):
    b = suggest_weights(nd, nu)
    assert (b.desirable_weight, b.undesirable_weight) == (1.0, 1.0)
    assert "already in the KTO range" in b.note


def test_paper_example_one_desirable_to_ten_undesirable():
    b = suggest_weights(100, 1000)
    assert 10 <= b.desirable_weight <= 13.34 and b.undesirable_weight == 1.0


def test_one_label_only_says_kto_can_still_train():
    for nd, nu, only in ((5, 0, "desirable"), (0, 5, "undesirable")):
        b = suggest_weights(nd, nu)
        assert b.ratio is None and not b.in_range
        assert (b.desirable_weight, b.undesirable_weight) == (1.0, 1.0)
        assert f"every row is {only}. KTO can still train on one label" in b.note


def test_check_warns_only_outside_the_range():
    assert check(10, 10, 1.0, 1.0) is None
    warning = check(10, 40, 1.0, 1.0)
    assert "weigh 0.25 times as much as the undesirable ones, less than the KTO paper advises" in warning
    assert "desirable_weight=5.2" in warning  # the ratio 1.3, near the top of the range (balance.TARGET)
    assert check(10, 0, 1.0, 1.0) is None
    assert ratio(10, 40, 5.2, 1.0) == pytest.approx(1.3)


def test_gauge_marks_the_ratio_and_keeps_far_values_on_the_dial():
    assert marker_position(gauge_figure(1.2)) == pytest.approx(1.2)
    assert "in the KTO range" in gauge_figure(1.2).axes[0].get_title()
    far = gauge_figure(50.0)
    assert marker_position(far) < 4.0 and "OUTSIDE" in far.axes[0].get_title()
    assert marker_position(gauge_figure(None)) is None


def test_length_histograms_count_rows_and_draw_max_length():
    lengths = TokenLengths(prompt=[5, 6, 7], completion=[3, 40, 90], total=[8, 46, 97], mismatched=[])
    fig = length_figure(lengths, max_length=50)
    prompt_ax, completion_ax, total_ax = fig.axes
    assert sum(p.get_height() for p in completion_ax.patches) == 3
    assert "1 over max_length=50" in total_ax.get_title()
    assert [line.get_xdata()[0] for line in total_ax.get_lines()] == [50]
    far = length_figure(lengths, max_length=4096).axes[2]
    assert "0 over max_length=4096" in far.get_title() and len(far.get_lines()) == 0


@pytest.mark.parametrize("nd,nu", [(247, 250), (240, 250), (250, 246), (230, 250)])
def test_an_about_balanced_file_keeps_the_measured_defaults(nd, nu):
    """Issue 30, item 10: a balanced file whose filters or a few flipped labels leave slightly fewer desirable rows
    keeps 1.0 / 1.0 (what README and RECIPES measured), and the check does not warn about it."""
    b = suggest_weights(nd, nu)
    assert (b.desirable_weight, b.undesirable_weight) == (1.0, 1.0) and b.in_range
    assert check(nd, nu, 1.0, 1.0) is None


def test_suggested_weights_do_not_jump_when_a_few_labels_flip():
    """Issue 30, item 3: flipping 4 labels of a balanced file used to move the suggestion between 1.3 and 1.0."""
    seen = {(suggest_weights(123 + k, 125 - k).desirable_weight, suggest_weights(123 + k, 125 - k).undesirable_weight)
            for k in range(-4, 5)}
    assert seen == {(1.0, 1.0)}


def test_imbalance_advice_is_said_in_words():
    """Issue 30, item 9: the advice says what the weights do, not only the formula."""
    b = suggest_weights(100, 1000)
    assert "λ" not in b.note and "each desirable row counts" in b.note
    assert "together weigh 1.3" in b.note and "times as much as the undesirable ones" in b.note
    assert "λ" not in check(10, 40, 1.0, 1.0)
