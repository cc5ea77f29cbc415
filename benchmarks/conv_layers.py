r"""Each convolution of a model, timed alone: forward, input gradient, weight gradient.

  python benchmarks/conv_layers.py                          # cnn (MNIST), lenet5 (CIFAR-10)
  python benchmarks/conv_layers.py --models=fml_cnn --batch_size=128
  XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/conv_layers.py   # a flag's effect
  python benchmarks/conv_layers.py --quick                  # one model, few calls (tests)
  taskset -c 0 python benchmarks/conv_layers.py --no_torch  # on one core

Where a convnet's training step goes on a CPU is mostly in its convolutions
(benchmarks/RESULTS.md, "Convnets on the CPU"). This script finds each `Conv` of a
model zoo entry by tracing it once, then times, jitted alone at the given batch size,
the three convolutions of a training step as fml_jax runs them (`fml_jax.conv.conv_nhwc`
and its custom gradients): the forward pass, the gradient with respect to the input
(`dx`; XLA drops it for a first layer, whose input needs none) and with respect to the
kernel (`dw`). With PyTorch installed, the same three through `torch.nn.functional.conv2d`
and autograd beside them (NCHW, PyTorch's own threads), so a per-layer ratio says which
kernel loses. The last two columns time the forward pass every way fml_jax can run
it (XLA's kernel on the layer as it is, on the 2x2 space-to-depth grid, one matmul over
the input's patches) and the weight gradient both ways (XLA's kernel over batch chunks,
the patches' matmul), and name the one training takes (`fml_jax.conv.conv_form`).
A column gives the forward pass's rate in GFLOP/s beside XLA's own float32 matmul
rate on a large product, measured in the same run: how near the layer runs to what
this CPU does at best. Run on one core (`taskset`), that is what each of two clients
trained at once gets (`fml_jax.rounds.executors.CPU_CONCURRENT_CLIENTS`).
Median of `--calls` calls after one warm-up. Prints a markdown table, writes JSON.
XLA flags are read from the environment as usual, so running it twice with different
`XLA_FLAGS` compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from fml_jax import conv  # pylint: disable=g-import-not-at-top
from fml_jax.models import build_model  # pylint: disable=g-import-not-at-top
from round_time import cpu_name  # pylint: disable=g-import-not-at-top  (benchmarks/)

# model -> the image shape it is timed on (the dataset its jobs in vs_pytorch.py use)
INPUTS = {"cnn": (28, 28, 1), "lenet5": (32, 32, 3), "fml_cnn": (32, 32, 3),
          "cnn_cifar": (32, 32, 3), "cnn_mnist": (28, 28, 1)}


def conv_layers(model_name: str, image_shape: tuple, batch_size: int) -> list[dict]:
  """Every `nn.Conv` the model calls, in call order: input shape, kernel shape, padding
  as ((top, bottom), (left, right)). Found by tracing the model once (no compute)."""
  model = build_model(model_name, 10, image_shape)
  found = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Conv) and context.method_name == "__call__":
      x = args[0]
      kernel = tuple(module.kernel_size) + (x.shape[-1], module.features)
      if any(s != 1 for s in np.atleast_1d(module.strides or 1)):
        raise ValueError(f"{model_name}: strided convolutions are not timed here")
      pads = (jax.lax.padtype_to_pads(x.shape[1:3], kernel[:2], (1, 1), module.padding)
              if isinstance(module.padding, str) else module.padding)
      found.append({"input": tuple(x.shape), "kernel": kernel,
                    "padding": tuple((int(lo), int(hi)) for lo, hi in pads)})
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  return found


def median_ms(call, calls: int) -> float:
  """Median wall time of `call()` over `calls` calls after one warm-up (which compiles),
  in ms; `call` blocks until its result is ready."""
  call()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def layer_gflop(layer: dict) -> float:
  """The layer's forward convolution in GFLOP (2 per multiply-add). Its weight gradient
  does as many; its input gradient as many up to the borders (all of them for SAME)."""
  b, h, w, cin = layer["input"]
  kh, kw, _, cout = layer["kernel"]
  (top, bottom), (left, right) = layer["padding"]
  out_h, out_w = h + top + bottom - kh + 1, w + left + right - kw + 1
  return 2 * b * out_h * out_w * cout * kh * kw * cin / 1e9


def usable_cores() -> int:
  """The cores this process may run on (`taskset` narrows them; Linux only, else all)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def matmul_gflops(size: int, calls: int) -> float:
  """XLA's float32 matmul rate on a size x size x size product, GFLOP/s: the reference
  for what this CPU does at best."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size))
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size))
  matmul = jax.jit(jnp.dot)
  ms = median_ms(lambda: jax.block_until_ready(matmul(a, b)), calls)
  return 2 * size ** 3 / 1e9 / (ms / 1e3)


def time_fml_jax(layer: dict, calls: int) -> dict:
  """The training step's three convolutions as fml_jax runs them; the forward pass every
  way: XLA's kernel on the layer as it is (`plain_forward`), on the space-to-depth grid
  (`grid_forward`), as the patches' matmul (`im2col_forward`); the weight gradient both
  ways (`plain_dw`, `im2col_dw`)."""
  padding = layer["padding"]
  x = jax.random.normal(jax.random.PRNGKey(0), layer["input"])
  w = jax.random.normal(jax.random.PRNGKey(1), layer["kernel"]) * 0.1
  out = jax.eval_shape(lambda x, w: conv.conv_nhwc(x, w, padding), x, w)
  dy = jax.random.normal(jax.random.PRNGKey(2), out.shape)
  vjp = lambda x, w, dy: jax.vjp(lambda x, w: conv.conv_nhwc(x, w, padding), x, w)[1](dy)
  functions = {
      "forward": (jax.jit(lambda x, w: conv.conv_nhwc(x, w, padding)), (x, w)),
      "dx": (jax.jit(lambda x, w, dy: vjp(x, w, dy)[0]), (x, w, dy)),
      "dw": (jax.jit(lambda x, w, dy: vjp(x, w, dy)[1]), (x, w, dy)),
      "plain_forward": (jax.jit(lambda x, w: jax.lax.conv_general_dilated(
          x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))), (x, w)),
      "grid_forward": (jax.jit(lambda x, w: conv.space_to_depth_conv(x, w, padding)), (x, w)),
      "im2col_forward": (jax.jit(lambda x, w: conv.im2col_conv(x, w, padding)), (x, w)),
      "plain_dw": (jax.jit(lambda x, dy: conv.chunked_weight_grad(x, dy, padding)), (x, dy)),
      "im2col_dw": (jax.jit(lambda x, dy: conv.im2col_weight_grad(x, dy, w.shape, padding)),
                    (x, dy)),
  }
  return {name: median_ms(lambda f=f, a=a: jax.block_until_ready(f(*a)), calls)
          for name, (f, a) in functions.items()}


def forward_form(kernel) -> str:
  """The forward pass's form in training (`conv.conv_form`), as the table names it."""
  return {"im2col": "im2col", "space_to_depth": "grid", "xla": "XLA"}[conv.conv_form(kernel)]


def torch_conv(torch, layer: dict):
  """The layer's convolution in PyTorch: NCHW input, OIHW kernel, the same padding."""
  (top, bottom), (left, right) = layer["padding"]
  return lambda x, w: torch.nn.functional.conv2d(
      torch.nn.functional.pad(x, (left, right, top, bottom)), w)


def time_torch(torch, layer: dict, calls: int) -> dict:
  b, h, w_, c = layer["input"]
  kh, kw, ci, co = layer["kernel"]
  x = torch.randn(b, c, h, w_, requires_grad=True)
  w = (torch.randn(co, ci, kh, kw) * 0.1).requires_grad_(True)
  conv2d = torch_conv(torch, layer)
  dy = torch.randn_like(conv2d(x, w))

  with torch.no_grad():
    forward = median_ms(lambda: conv2d(x, w), calls)
  dx = median_ms(lambda: torch.autograd.grad(conv2d(x, w.detach()), x, dy), calls)
  dw = median_ms(lambda: torch.autograd.grad(conv2d(x.detach(), w), w, dy), calls)
  # autograd's two timings include a forward pass: take it out, as fml_jax's exclude it.
  return {"forward": forward, "dx": max(dx - forward, 0.0), "dw": max(dw - forward, 0.0)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="cnn,lenet5", help=f"comma-separated: {', '.join(INPUTS)}")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--calls", type=int, default=30, help="timed calls per measurement")
  parser.add_argument("--quick", action="store_true", help="lenet5 at batch 8, 3 calls")
  parser.add_argument("--no_torch", action="store_true", help="time fml_jax only")
  parser.add_argument("--out", default="benchmarks/results/conv_layers.json")
  args = parser.parse_args(argv)
  models = ["lenet5"] if args.quick else args.models.split(",")
  batch, calls = (8, 3) if args.quick else (args.batch_size, args.calls)
  unknown = sorted(set(models) - set(INPUTS))
  if unknown:
    parser.error(f"--models: unknown {unknown}; allowed: {', '.join(INPUTS)}")
  torch = None
  if not args.no_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      print("PyTorch is not installed: its columns are left empty (pip install torch)")

  matmul_size = 256 if args.quick else 2048
  matmul_rate = matmul_gflops(matmul_size, calls)
  rows = []
  for name in models:
    for i, layer in enumerate(conv_layers(name, INPUTS[name], batch)):
      row = {"model": name, "layer": i + 1, **layer, "gflop": layer_gflop(layer),
             "fml_jax_ms": time_fml_jax(layer, calls)}
      if torch is not None:
        row["torch_ms"] = time_torch(torch, layer, calls)
      rows.append(row)

  print(f"\n{cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__}, batch {batch}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {usable_cores()} "
        f"cores usable; median of {calls} calls, ms; XLA's float32 matmul "
        f"({matmul_size}^3): {matmul_rate:.0f} GFLOP/s\n")
  print("| model | layer | input (NHWC) | kernel (HWIO) | forward | forward GFLOP/s | dx | dw "
        "| PyTorch forward / dx / dw | forward: XLA's kernel / the grid / im2col (taken) "
        "| dw: XLA's kernel / im2col (taken) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    t = r["fml_jax_ms"]
    p = r.get("torch_ms")
    theirs = f"{p['forward']:.2f} / {p['dx']:.2f} / {p['dw']:.2f}" if p else "n/a"
    form = forward_form(r["kernel"])
    forwards = f"{t['plain_forward']:.2f} / {t['grid_forward']:.2f} / {t['im2col_forward']:.2f}"
    dws = f"{t['plain_dw']:.2f} / {t['im2col_dw']:.2f}"
    print(f"| {r['model']} | {r['layer']} | {'x'.join(map(str, r['input']))} | "
          f"{'x'.join(map(str, r['kernel']))} | {t['forward']:.2f} | "
          f"{r['gflop'] / (t['forward'] / 1e3):.0f} | {t['dx']:.2f} | "
          f"{t['dw']:.2f} | {theirs} | {forwards} ({form}) | "
          f"{dws} ({'im2col' if form == 'im2col' else 'XLA'}) |")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                  "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "torch": getattr(torch, "__version__", None)},
      "usable_cores": usable_cores(),
      "matmul": {"size": matmul_size, "gflops": matmul_rate},
      "batch_size": batch, "calls": calls, "layers": rows}, indent=1))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
