"""experiments/colab_tpu.ipynb: stored without outputs, and runs end to end (QUICK, on CPU).

The run test injects `QUICK = True` in a cell right after the one tagged `parameters`
(as papermill does) and executes the notebook in a fresh IPython kernel from the
`experiments/` folder, so the notebook's own "find the checkout" step is exercised.
"""

import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = REPO / "experiments" / "colab_tpu.ipynb"


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_index(nb) -> int:
  tagged = [i for i, cell in enumerate(nb.cells)
            if "parameters" in cell.get("metadata", {}).get("tags", [])]
  assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
  assert nb.cells[tagged[0]].cell_type == "code"
  return tagged[0]


def test_stored_notebook_is_valid_and_has_no_outputs():
  nb = _read()
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"cell {i} was stored with outputs; clear them"
      assert cell.execution_count is None, f"cell {i} was stored with an execution count"
  params = nb.cells[_parameters_index(nb)].source
  for name in ("QUICK", "NUM_CLIENTS", "ROUNDS", "REPO_URL"):
    assert re.search(rf"^{name}\s*=", params, re.M), f"the parameters cell lacks {name}"


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
  """A 'python3' kernel spec that runs this interpreter, whatever is registered elsewhere;
  jupyter's and IPython's folders and the notebook's temporary files under tmp_path."""
  from ipykernel import kernelspec   # pylint: disable=g-import-not-at-top
  prefix = tmp_path / "jupyter_prefix"
  kernelspec.install(user=False, prefix=str(prefix), kernel_name="python3")
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  (tmp_path / "tmp").mkdir()
  monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))   # the notebook's tempfile.mkdtemp
  return "python3"


def test_notebook_runs_quick(python3_kernel):
  nb = _read()
  injected = nbformat.v4.new_code_cell("QUICK = True")
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(_parameters_index(nb) + 1, injected)
  client = NotebookClient(nb, timeout=600, kernel_name=python3_kernel,
                          resources={"metadata": {"path": str(REPO / "experiments")}})
  client.execute()   # raises CellExecutionError, with the cell and traceback, on any error

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  match = re.search(r"final global_test_acc\s+(\d+\.\d+)", text)
  assert match, f"no accuracy in the summary printout:\n{text[-3000:]}"
  assert 0.0 <= float(match.group(1)) <= 1.0
  assert re.search(r"final local_test_acc_mean\s+\d+\.\d+", text)
  assert re.search(r"clients/s\s+\d+\.\d+", text)
  assert "backend: " in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 2, f"expected the accuracy and scaling plots, got {len(images)} images"
