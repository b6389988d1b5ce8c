"""Per-site work on Ray (parallel.RayCluster, the CLI's --ray): on a local Ray cluster this module
starts itself (2 CPUs), the same output bytes as the local threads; the measurement objects that
travel to the workers pickle without their onnxruntime sessions; a bad --ray is one line, exit 2."""
from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import onnx
import pytest

import models
from bayesq_onnx import Analysis, Recipe, compress, parallel
from bayesq_onnx.cli import main
from bayesq_onnx.errors import BayesQError
from bayesq_onnx.parallel import RayCluster, connect_ray, parallel_map, use_ray
from bayesq_onnx.plan.proxy import OutputDistortion
from bayesq_onnx.runtime.stream import SegmentRun

ray = pytest.importorskip("ray", reason="Ray is part of the test extra: pip install -e '.[test]'")
# the workers cannot import this file: the functions defined here travel by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    """A local cluster of 2 worker CPUs for the module, started as --ray local starts one (workers
    import this checkout's bayesq_onnx, shipped by the job)."""
    assert connect_ray("local", num_cpus=2)
    yield
    ray.shutdown()


def _raise_on_three(x):
    if x == 3:
        raise BayesQError("three is bad input")
    return x


def test_tasks_run_on_the_workers_in_order(cluster):
    with use_ray("auto"):   # the process is connected already: that connection is used
        pids = list(parallel_map(lambda x: (x, os.getpid()), range(6)))
        assert [x for x, _ in pids] == list(range(6))
        assert os.getpid() not in {p for _, p in pids}
        # the user's errors come back as they were raised, one line
        with pytest.raises(BayesQError, match="^three is bad input$"):
            list(parallel_map(_raise_on_three, range(5)))
    assert ray.is_initialized()   # not opened by use_ray: left open


CASES = {"residual": (models.residual, models.residual_data, "kron"),   # kron: the default tables
         "cnn": (models.cnn, models.cnn_data, "proxy"),                 # grids chosen end to end
         "embed": (models.embed, models.embed_data, "kron")}            # a Gather site


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_bytes_on_ray_as_on_local_threads(tmp_path, cluster, case):
    build, data, tables = CASES[case]
    src = tmp_path / f"{case}.onnx"
    onnx.save(build(), src)
    local, remote = tmp_path / "local.onnx", tmp_path / "ray.onnx"
    a = compress(src, Recipe(bits=3.0, tables=tables), calib=data(), output=local).report
    with use_ray("auto"):
        assert isinstance(parallel._executor, RayCluster)
        b = compress(src, Recipe(bits=3.0, tables=tables), calib=data(), output=remote).report
    assert local.read_bytes() == remote.read_bytes()
    assert a["plan"] == b["plan"] and a["plan_check"] == b["plan_check"]


def test_sequential_same_bytes_on_ray(tmp_path, cluster):
    """--sequential decodes each block's quantized weights on the workers too: the same bytes."""
    outs = [tmp_path / "local.onnx", tmp_path / "ray.onnx"]
    compress(models.residual(), Recipe(bits=3.0, sequential=True), calib=models.residual_data(), output=outs[0])
    with use_ray("auto"):
        compress(models.residual(), Recipe(bits=3.0, sequential=True), calib=models.residual_data(), output=outs[1])
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_cli_on_ray_same_bytes_and_progress(tmp_path, cluster, mlp_path, capsys):
    outs = [tmp_path / "local.onnx", tmp_path / "ray.onnx"]
    assert main(["compress", str(mlp_path), "--bits", "3", "-o", str(outs[0]), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["compress", str(mlp_path), "--bits", "3", "-o", str(outs[1]), "--ray", "auto"]) == 0
    err = capsys.readouterr().err
    assert "loss tables (kron): 4/4 done" in err and "packing: 4/4 done" in err, err
    assert outs[0].read_bytes() == outs[1].read_bytes()


@pytest.mark.parametrize("argv, env, needle", [
    (["--ray", "127.0.0.1:1"], {}, "cannot connect to Ray at 127.0.0.1:1: "),
    # auto resolves RAY_ADDRESS as Ray does (127.0.0.1 may become this node's address)
    (["--ray", "auto"], {"RAY_ADDRESS": "127.0.0.1:1"}, "cannot connect to Ray at "),
    (["--ray", "nowhere"], {}, "--ray expects auto, local, HOST:PORT or ray://HOST:PORT, got 'nowhere'"),
    (["--ray", "local"], {"no ray": "1"}, "--ray needs the ray package: pip install 'bayesq-onnx[ray]'"),
])
def test_bad_ray_is_one_line_exit_2(tmp_path, mlp_path, capsys, monkeypatch, argv, env, needle):
    # as if this process were not connected yet (the cluster fixture may have run first)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for k, v in env.items():
        if k == "no ray":
            monkeypatch.setitem(sys.modules, "ray", None)   # import ray fails as where it is not installed
        else:
            monkeypatch.setenv(k, v)
    out = tmp_path / "out.onnx"
    assert main(["compress", str(mlp_path), "--bits", "3", "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_probe_and_segments_pickle_without_sessions():
    """What Ray ships to a worker: a copy measures exactly as the original does, and a copy of the
    analysis's stream passes data through as the original does."""
    a = Analysis(models.residual(), Recipe(bits=4.0), calib=models.residual_data())
    d = OutputDistortion(a.probe, a.fit, 8)
    names = [s.name for s in a.sites]
    run = SegmentRun(a.probe, names, a.fit, 8)
    d2, run2 = pickle.loads(pickle.dumps((d, run)))
    rng = np.random.default_rng(0)
    for s in a.sites:
        w = a.probe.weights[s.name]
        noisy = {s.name: (w + 0.05 * np.abs(w).mean() * rng.standard_normal(w.shape)).astype(np.float32)}
        assert d(noisy) == d2(noisy) > 0
        b = run.first_segment(s.name)
        for x, y in zip(run.outputs_from(b, noisy), run2.outputs_from(b, noisy)):
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    stream2 = pickle.loads(pickle.dumps(a.stream))
    states, states2 = a.stream.start(a.fit, 8), stream2.start(a.fit, 8)
    for k in range(len(a.stream)):
        for x, y in zip(a.stream.advance(k, states), stream2.advance(k, states2)):
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_model_over_2gb_is_refused_in_one_line(cluster):
    a = Analysis(models.mlp(), Recipe(bits=4.0), calib=models.mlp_data())
    a.probe._proto = None   # what a probe over protobuf's 2 GB keeps: a file on this machine only
    with use_ray("auto"), pytest.raises(BayesQError, match="^--ray: models over 2 GB are not measured on Ray yet"):
        a.compress(4.0)
