"""`--plot` pictures: what each one draws (read from the figure as it is saved), not only that a PNG exists."""

import sys

import pytest
from helpers import MiB, plan_at

from autobatch import ladder, plots
from autobatch.errors import AutobatchError
from autobatch.planner import Trial


@pytest.fixture
def drawn(monkeypatch):
    """{file name: the figure's axes} for every PNG written while the test runs (captured at savefig)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    saved = {}
    original = Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        saved[str(path).rsplit("/", 1)[-1]] = fig.axes[0]
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def points(ax) -> dict[str, list[tuple[float, float]]]:
    """Scatter points and line vertices by legend label."""
    found = {c.get_label(): [tuple(map(float, p)) for p in c.get_offsets()] for c in ax.collections
             if len(c.get_offsets())}
    found.update({line.get_label(): list(zip(map(float, line.get_xdata()), map(float, line.get_ydata())))
                  for line in ax.get_lines()})
    return found


def test_memory_plot_draws_each_trial_the_budget_and_the_choice(tmp_path, drawn):
    trials = [Trial(1, 20 * MiB, True, 0.1), Trial(4, 60 * MiB, True, 0.3), Trial(6, 85 * MiB, False, 0.4),
              Trial(5, 90 * MiB, False, 0.0, oom=True)]
    path = plots.plot_memory(trials, 72 * MiB, 80 * MiB, 4, plots.plot_dir(str(tmp_path)))
    found = points(drawn[path.name])
    assert found["fits"] == [(1, 20), (4, 60)]
    assert found["over budget"] == [(6, 85)]
    assert found["OOM (peak where it stopped)"] == [(5, 90)]
    assert found["chosen micro-batch 4"] == [(4, 60)]
    assert {y for _, y in found["budget"]} == {80} and {y for _, y in found["usable (after headroom)"]} == {72}


def test_memory_plot_leaves_out_a_budget_far_above_every_trial(tmp_path, drawn):
    trials = [Trial(1, 20 * MiB, True, 0.1), Trial(2, 30 * MiB, True, 0.2)]
    path = plots.plot_memory(trials, 64_000 * MiB, 64_000 * MiB, 2, plots.plot_dir(str(tmp_path)))
    ax = drawn[path.name]
    assert "budget" not in points(ax) and ax.get_ylim()[1] == pytest.approx(1.25 * 30)
    assert any("far above every trial" in text.get_text() for text in ax.texts)


def test_loss_noise_and_time_plots_draw_their_data(tmp_path, drawn):
    directory = plots.plot_dir(str(tmp_path / "png"))
    curves = {"B=8": [{"tokens": 100, "loss": 3.0}, {"tokens": 200, "loss": 2.5}],
              "B=16": [{"tokens": 100, "loss": 3.2}, {"tokens": None, "loss": 9.0}, {"tokens": 200, "loss": 2.4}]}
    noise = {"history": [{"step": 1, "b_simple_ema": 10.0}, {"step": 2, "b_simple_ema": None},
                         {"step": 3, "b_simple_ema": 12.0}], "low": 8.0, "high": 15.0, "b_simple": 11.0}
    rungs = ladder.make_rungs([plan_at(8, 4), plan_at(16, 4)], 100, base_lr=1e-4, base_batch=8, lr_rule="sqrt",
                             b_noise=12)
    written = [plots.plot_loss_curves(curves, directory), plots.plot_noise_scale(noise, directory),
               plots.plot_time_to_target(rungs, 8, directory)]
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in written)
    from matplotlib.colors import to_hex

    loss, gns, times = (drawn[p.name] for p in written)
    assert points(loss) == {"B=8": [(100, 3.0), (200, 2.5)], "B=16": [(100, 3.2), (200, 2.4)]}
    history = points(gns)["B_simple (bias-corrected moving averages)"]
    assert history == [(1, 10.0), (3, 12.0)]  # the step without an estimate is left out, not drawn as 0
    band = gns.patches[0].get_extents().transformed(gns.transData.inverted())
    assert (band.y0, band.y1) == pytest.approx((8.0, 15.0))
    bars = times.patches
    assert [b.get_height() for b in bars] == pytest.approx([r.time_to_target_s for r in rungs])
    assert [to_hex(b.get_facecolor()) for b in bars] == [to_hex("tab:green"), to_hex("tab:gray")]  # 8 recommended


def test_a_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(AutobatchError, match=r"pip install 'autobatch\[plot\]'"):
        plots.require()
