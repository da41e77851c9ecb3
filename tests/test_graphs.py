"""CUDA graphs of the embedder (patchcore_fast/graphs.py, issue #24 item 4).

Off CUDA the wrapper calls the function as it is (tested here); on CUDA the replayed
graphs must give the eager embeddings, one graph per input shape, results that stay valid
after the next replay, and a capture that cannot be made must turn the graphs off with a
warning, not break scoring (CUDA tests: the GPU machine's gpu_check.sh runs them).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from patchcore_fast.graphs import MAX_GRAPHS, GraphedForward
from patchcore_fast.model import PatchCore, PatchCoreConfig

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _model(device: str, precision: str = "fp32") -> PatchCore:
    return PatchCore(PatchCoreConfig(backbone="resnet18", pretrained=False, device=device,
                                     precision=precision, seed=0))


def test_off_cuda_the_function_runs_as_it_is():
    calls = []

    def fn(x):
        calls.append(x)
        return x * 2, "grid"

    g = GraphedForward(fn)
    x = torch.ones(2, 3)
    out, extra = g(x)
    assert torch.equal(out, x * 2) and extra == "grid" and calls == [x]
    assert g.captured == 0 and g.failed is None


def test_model_embed_with_graphs_on_the_cpu_is_the_embedder():
    model = _model("cpu")
    model.cuda_graphs = True
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        got, grid = model.embed(x)
        want, grid0 = model.embedder(x)
    assert torch.equal(got, want) and grid == grid0 == (8, 8)
    assert model._graphed is None  # nothing captured off CUDA


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_embeddings_are_the_eager_ones_cuda(precision):
    model = _model("cuda", precision)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 3, 96, 96, generator=g).cuda() for b in (4, 4, 1, 4)]
    with torch.inference_mode():
        eager = [model.embedder(x)[0] for x in batches]
        model.cuda_graphs = True
        graphed = [model.embed(x) for x in batches]
    assert model._graphed.captured == 2  # batches of 4 and of 1
    for (got, grid), want in zip(graphed, eager):
        assert grid == (12, 12)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Each result is its own tensor: the replays after it left it as it was.
    assert graphed[0][0].data_ptr() != graphed[1][0].data_ptr()
    torch.testing.assert_close(graphed[0][0], eager[0], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@CUDA
def test_shapes_beyond_the_bound_run_eagerly_cuda():
    model = _model("cuda")
    model.cuda_graphs = True
    with torch.inference_mode():
        for b in range(1, MAX_GRAPHS + 3):
            x = torch.randn(b, 3, 64, 64, device="cuda")
            torch.testing.assert_close(model.embed(x)[0], model.embedder(x)[0], rtol=1e-5,
                                       atol=1e-5)
    assert model._graphed.captured == MAX_GRAPHS


@pytest.mark.cuda
@CUDA
def test_scores_with_graphs_equal_scores_without_cuda(tmp_path):
    # Through the model's file path (predict), as score and the service run it.
    from patchcore_fast.demo import write_demo_data

    write_demo_data(tmp_path, seed=0, n_train=6, n_test_good=2, n_test_defect=2)
    root = tmp_path / "widget"
    model = _model("cuda").fit(root / "train" / "good", false_reject_rate=None)
    # Reader processes: the loader's pin-memory thread allocates page-locked memory while
    # the graph is captured (graphs.py: thread_local capture).
    model.config.num_workers = 2
    tests = sorted((root / "test").rglob("*.png"))
    plain = model.predict(tests)
    model.cuda_graphs = True
    graphed = model.predict(tests)
    assert model._graphed.captured >= 1
    torch.testing.assert_close(torch.as_tensor(graphed.scores),
                               torch.as_tensor(plain.scores), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@CUDA
def test_a_capture_that_fails_turns_the_graphs_off_cuda():
    # A function that waits for the device (.item()) cannot be captured: the wrapper
    # warns once, runs it as it is from then on, and the results are right. In a child
    # process, so that a CUDA error of the failed capture cannot reach the other tests.
    code = textwrap.dedent("""
        import warnings, torch
        from patchcore_fast.graphs import GraphedForward
        def fn(x):
            return x * float(x.sum().item() > 0), None
        g = GraphedForward(fn)
        x = torch.ones(4, device="cuda")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out, _ = g(x)
        assert g.failed and g.captured == 0, g.failed
        assert any("CUDA graphs turned off" in str(m.message) for m in w)
        assert torch.equal(out, x) and torch.equal(g(2 * x)[0], 2 * x)
        torch.cuda.synchronize()
        print("ok")
    """)
    from child import CHILD_CWD, child_env

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=CHILD_CWD, env=child_env(), timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
