"""The GPU suite's CPU rehearsal (benchmarks/accelerator_suite.py --tiny). A file of its
own: pytest-xdist gives each file to one worker, so this minute runs beside the other
benchmarks' quick modes instead of after them."""

import importlib.util
import json
import subprocess
import sys

from conftest import REPO, requires_mnist


@requires_mnist   # parts 4 and 6 train on MNIST, as the suite does on the GPU
def test_accelerator_suite_tiny(tmp_path):
  # The GPU suite's rehearsal (benchmarks/accelerator_suite.py --tiny): every part runs,
  # reports ok and prints its table. About a minute on an idle 2-core CPU (compiles are
  # cached across runs); a part's own guard turns a failure into a FAILED row, so a
  # broken part shows here as its status.
  out = tmp_path / "suite"
  proc = subprocess.run([sys.executable, "benchmarks/accelerator_suite.py", "--tiny",
                         f"--out={out}", f"--carry={tmp_path / 'no_carry'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  summary = json.loads((out / "summary.json").read_text())
  parts = summary["parts"]
  assert list(parts) == ["1", "2", "3a", "3b", "3c", "4", "5", "6"]
  for key, part in parts.items():
    assert part["status"] == "ok", (key, part.get("error"), proc.stdout[-3000:])
    assert part["table"] and part["table"][0].startswith("|"), key
    assert "\n".join(part["table"]) in proc.stdout   # printed as it finished
  assert proc.returncode == 0, proc.stderr[-2000:]
  for precision in ("bf16", "fp32"):
    assert parts["1"]["matmul_peak"][precision]["tflops"] > 0
  assert parts["2"]["runs"][0]["passed"] == 1 and parts["2"]["runs"][0]["failed"] == 0
  mlp = parts["3a"]["client_scaling"]["results"]["mlp"]
  assert sorted(mlp, key=int) == ["1", "8"] and mlp["8"]["vmap"]["client_steps_per_s"] > 0
  assert parts["3c"]["comparison"][0]["faster"] in ("vmap", "lax.map")
  [job] = parts["4"]["jobs"].values()
  assert job["vmap"]["median_round_s"] > 0
  if importlib.util.find_spec("torch"):   # the PyTorch loop's estimate needs torch
    assert job["pytorch_round_s_estimate"] > 0
  assert parts["5"]["scale"]["clients"] == 200 and parts["5"]["scale"]["all_finite"]
  assert len(parts["6"]["fedmd"]["round_s"]) == 2
  markdown = (out / "summary.md").read_text()
  assert "| part | what | status |" in markdown and "## 6. FedMD" in markdown
  assert "## Summary" in proc.stdout and "| target | measured | met |" in proc.stdout
