"""Every slider, dropdown and toggle of every notebook moved to its extremes, in a real kernel.

Each notebook runs top to bottom in a Jupyter kernel of this environment (nbclient, as nbval does),
then one more cell, PROBE, walks every live widget: a numeric slider to its min and max, a selection
(slider, dropdown, toggle buttons) to its first and last option, then back to where it was. Moving a
widget runs its callback in the kernel, as dragging it in JupyterLab does. A callback that raises is
caught by ipywidgets and shown as a traceback (`InteractiveShell.showtraceback`), which PROBE records;
the test fails on any. Text boxes are left alone: their bad inputs (empty, over-long, hostile) are
the catalogue's (docs/bad-inputs.md). What the learner *sees* (the figure redrawn) needs a browser.
"""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))

PROBE = r'''
import json as _json
import traceback as _traceback

import ipywidgets as _widgets

_shell, _tracebacks = get_ipython(), []
_show = _shell.showtraceback


def _record(*args, **kwargs):                       # what ipywidgets calls when a callback raises
    _tracebacks.append(_traceback.format_exc(limit=-3))
    return _show(*args, **kwargs)


def _extremes(widget):
    if isinstance(widget, (_widgets.SelectionSlider, _widgets.Dropdown, _widgets.ToggleButtons,
                           _widgets.RadioButtons, _widgets.Select)):
        values = widget._options_values           # the values behind the labels, however options were given
        return [values[0], values[-1]] if values else []
    if isinstance(widget, (_widgets.IntSlider, _widgets.FloatSlider, _widgets.FloatLogSlider,
                           _widgets.BoundedIntText, _widgets.BoundedFloatText)):
        return [widget.min, widget.max]
    if isinstance(widget, (_widgets.Checkbox, _widgets.ToggleButton)):
        return [not widget.value]
    return []


_shell.showtraceback, _moves = _record, []
try:
    for _widget in list(_widgets.Widget.widgets.values()):
        _values = [] if getattr(_widget, "disabled", False) else _extremes(_widget)
        for _value in [*_values, _widget.value] if _values else []:
            try:
                _widget.value = _value
            except Exception:                      # a callback observed directly, not through interact
                _tracebacks.append(_traceback.format_exc(limit=-3))
            _moves.append(f"{type(_widget).__name__} {getattr(_widget, 'description', '')!r} -> {_value!r}")
finally:
    _shell.showtraceback = _show
print("PROBE " + _json.dumps({"moves": _moves, "tracebacks": _tracebacks}))
'''


def probe_notebook(path: Path) -> dict:
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()
    printed = "".join(output.get("text", "") for output in notebook.cells[-1].outputs if output.get("name") == "stdout")
    return json.loads(printed.split("PROBE ", 1)[1])


def widgets_in(path: Path) -> bool:
    return "ipywidgets" in path.read_text() or "widgets." in path.read_text()


@pytest.mark.slow
@pytest.mark.bad_input(kind="a notebook widget moved to its extremes (min and max, first and last option)",
                       gets="its figure or table redrawn, no traceback")
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if widgets_in(p)], ids=lambda p: p.stem)
def test_every_widget_survives_its_extremes(path):
    result = probe_notebook(path)
    assert result["moves"], f"{path.name}: no widget was found to move"
    assert not result["tracebacks"], f"{path.name}: " + "\n".join(result["tracebacks"])


def test_the_probe_sees_a_callback_that_raises_at_an_extreme(tmp_path):
    """The probe itself against a notebook whose slider breaks only at its maximum."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import ipywidgets as widgets\n"
        "def show(n=3):\n"
        "    print([1, 2, 3][:n][n - 1])      # fine up to n = 3, an IndexError above\n"
        "_ = widgets.interact(show, n=widgets.IntSlider(value=3, min=1, max=5))")])
    path = tmp_path / "broken.ipynb"
    nbformat.write(notebook, path)
    result = probe_notebook(path)
    assert "IntSlider 'n' -> 5" in result["moves"] and "IntSlider 'n' -> 1" in result["moves"]
    assert len(result["tracebacks"]) == 1 and "IndexError" in result["tracebacks"][0]
