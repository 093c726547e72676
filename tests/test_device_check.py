"""benchmarks/device_check.sh: the GPU check's dry run on the CPU, and how a
part that runs out of time keeps what it had."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from benchmarks import device_check

ROOT = pathlib.Path(__file__).resolve().parents[1]

# what every part's file must hold, besides the keys of every part
EXPECTED = {
    "env": ("cpu", "versions", "nvidia_smi", "jax", "torch"),
    "correctness": ("devices", "tolerances", "results", "passed"),
    "speed": ("torch", "peaks_nominal", "peaks_measured", "sizes"),
    "limit": ("config", "mfattn", "torch"),
    "study": ("stages_planned", "stages", "largest_done"),
}
COMMON = ("part", "status", "dry_run", "started", "finished", "elapsed_s", "errors")


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # one CPU device, as on the GPU machine's host
    return env


@pytest.mark.slow
def test_dry_run(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        ["bash", "benchmarks/device_check.sh", str(out), "--dry-run"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    files = sorted(p.name for p in out.rglob("*"))
    assert len(files) <= 8, files
    assert set(files) == {f"{p}.json" for p in device_check.PARTS} | {"log.txt"}
    log = (out / "log.txt").read_text()
    for part in device_check.PARTS:
        data = json.loads((out / f"{part}.json").read_text())
        missing = [k for k in COMMON + EXPECTED[part] if k not in data]
        assert not missing, (part, missing, log[-3000:])
        assert data["status"] == "done", (part, data.get("error"), log[-3000:])
        assert data["errors"] == [], (part, data["errors"])
        assert not data.get("skipped"), (part, data["skipped"])
        assert data["dry_run"] is True
    # the summary: one line per part, every part done
    summary = res.stdout.split("=== summary")[1].splitlines()[1:]
    assert [line.split()[:2] for line in summary] == [[p, "done"] for p in device_check.PARTS]

    corr = json.loads((out / "correctness.json").read_text())
    assert corr["passed"] is True
    checks = {k.split("/")[1] for k in corr["results"]}
    assert {
        "kernel_dense",
        "kernel_chunked",
        "solve_discrete",
        "solve_limit",
        "train_step",
    } <= checks
    for r in corr["results"].values():
        assert r["max_rel_diff"] <= r["tol"]
    speed = json.loads((out / "speed.json").read_text())
    for size, row in speed["sizes"].items():
        for name, r in row["mfattn"].items():
            if isinstance(r, dict):
                assert r["median"] > 0 and r["flops_per_s"] > 0, (size, name, r)
        torch = row["torch"]
        assert torch == "skipped: torch not installed" or torch["median"] > 0, torch
    limit = json.loads((out / "limit.json").read_text())
    assert limit["mfattn"]["median"] > 0
    if isinstance(limit["torch"], dict):  # the two limits are the same limit
        assert limit["agreement"]["passed"], limit["agreement"]
    else:
        assert limit["torch"] == "skipped: torch not installed"
    study = json.loads((out / "study.json").read_text())
    stage = study["stages"][study["largest_done"]]
    assert stage["status"] == "done" and stage["data"]["points"], stage["status"]


def test_killed_part_keeps_what_it_had(tmp_path):
    """SIGTERM (what `timeout` sends when a part's budget runs out) leaves the
    part's file valid, with every item recorded before it and status `killed`."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from benchmarks.device_check import PartRecord
        rec = PartRecord({str(tmp_path)!r}, "speed", budget=1.0)
        rec.set(("sizes", "small"), {{"median": 0.5}})
        print("ready", flush=True)
        time.sleep(60)
        rec.set(("sizes", "long"), {{"median": 1.0}})
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 124
    data = json.loads((tmp_path / "speed.json").read_text())
    assert data["status"] == "killed"
    assert "budget" in data["error"]
    assert data["sizes"] == {"small": {"median": 0.5}}
    assert [p.name for p in tmp_path.iterdir()] == ["speed.json"]  # no temporary file left


def test_finish_and_summary(tmp_path):
    """A part whose process died before it could say so is marked by the
    script: `killed` after `timeout`'s exit status, `failed` otherwise, and a
    part without a file gets one; the summary has a line per part."""
    (tmp_path / "speed.json").write_text(json.dumps({"part": "speed", "status": "running"}))
    device_check.finish_part(tmp_path, "speed", 124)
    device_check.finish_part(tmp_path, "limit", 1)
    (tmp_path / "env.json").write_text(
        json.dumps({"part": "env", "status": "done", "elapsed_s": 1.0, "errors": []})
    )
    device_check.finish_part(tmp_path, "env", 0)  # a finished part is left alone
    assert json.loads((tmp_path / "speed.json").read_text())["status"] == "killed"
    assert json.loads((tmp_path / "limit.json").read_text())["status"] == "failed"
    assert json.loads((tmp_path / "env.json").read_text())["status"] == "done"
    lines = device_check.summary(tmp_path)
    assert [line.split()[:2] for line in lines] == [
        ["env", "done"],
        ["correctness", "missing"],
        ["speed", "killed"],
        ["limit", "failed"],
        ["study", "missing"],
    ]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`part`"):
        device_check.run_part(tmp_path, "gpu")
    res = subprocess.run(
        ["bash", "benchmarks/device_check.sh", str(tmp_path), "--dryrun"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "--dryrun" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_study_stages_grow():
    """The study's stages on the GPU: each a main grid alone (no sweeps), each
    larger than the one before, the last the `gpu` preset."""
    from benchmarks.scaling import PRESETS, conditions

    stages = device_check.study_stages(dry_run=False)
    assert list(stages) == ["quick", "full_main", "gpu"]
    assert stages["gpu"] == PRESETS["gpu"]
    sizes = []
    for cfg in stages.values():
        assert list(conditions(cfg)) == [cfg.main_condition]
        sizes.append((max(cfg.L) * max(cfg.H), cfg.nodes * cfg.particles, cfg.inits * cfg.steps))
    for small, big in zip(sizes, sizes[1:]):
        assert all(b >= a for a, b in zip(small, big)) and big != small, sizes
    assert max(PRESETS["gpu"].L) > max(PRESETS["full"].L)
    assert max(PRESETS["gpu"].H) > max(PRESETS["full"].H)
    dry = device_check.study_stages(dry_run=True)
    assert list(dry) == ["dry"] and dry["dry"].inits >= 3  # the jackknife leaves one out
